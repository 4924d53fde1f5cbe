"""The layering of docs/architecture.md, checked on the source: the library never imports the run layer.

Library: every module of lxmert_pl/ outside lxmert_pl/runs/. Entry points (the top-level scripts and the packages'
`__main__.py` command modules) belong to the run layer and may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lxmert_pl"


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved against `package`, by default the
    package the file lies in)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    if package is None:
        package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                names.add(node.module)
    return names


def library_modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "runs" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"]


def test_the_library_never_imports_the_run_layer():
    offenders = {
        str(path.relative_to(PACKAGE.parent)): sorted(m for m in imported_modules(path) if m.startswith("lxmert_pl.runs"))
        for path in library_modules()
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"library modules import the run layer: {offenders}"


def test_the_check_sees_relative_and_absolute_imports(tmp_path):
    """The scan must catch both spellings (a check that cannot fail is no check)."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..runs.errors import user_errors\nimport lxmert_pl.runs.cli\n", encoding="utf-8")
    assert imported_modules(probe, "lxmert_pl.detector") >= {"lxmert_pl.runs.errors", "lxmert_pl.runs.cli"}


def test_the_two_detector_loaders_do_not_import_each_other():
    """`loading` (port-format weights) dispatches to `caffemodel` (caffe weights); what both need (key names, the load
    report, the recorded geometry) lives in `detector.port_format`, so `caffemodel` never imports `loading`."""
    detector = PACKAGE / "detector"
    assert "lxmert_pl.detector.caffemodel" in imported_modules(detector / "loading.py")
    assert "lxmert_pl.detector.loading" not in imported_modules(detector / "caffemodel.py")
    assert "lxmert_pl.detector.port_format" in imported_modules(detector / "caffemodel.py")
    assert not {"lxmert_pl.detector.loading", "lxmert_pl.detector.caffemodel"} & imported_modules(
        detector / "port_format.py")
