"""`check_tsv`: decode every row of a feature TSV and report what is wrong.

CLI: `python -m lxmert_pl.features check PATH.tsv`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lxmert_pl.features.codec import decode_row
from lxmert_pl.features.errors import FeatureFileError, repair_command
from lxmert_pl.features.lines import READ_BUFFER_BYTES, is_blank, is_complete_row, iter_lines


@dataclass
class TsvCheckReport:
    """Outcome of `check_tsv`: counts, the first errors, the feature dims seen and a truncated tail."""

    path: Path
    rows: int = 0
    error_count: int = 0
    errors: list[str] = field(default_factory=list)
    feature_dims: set[int] = field(default_factory=set)
    truncated_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and self.truncated_bytes == 0 and len(self.feature_dims) <= 1

    def summary(self) -> str:
        dims = ", ".join(str(d) for d in sorted(self.feature_dims)) or "-"
        lines = [f"{self.path}: {self.rows:,} valid rows, feature dim {dims}, {self.error_count} bad rows"]
        lines += [f"  {message}" for message in self.errors]
        if self.error_count > len(self.errors):
            lines.append(f"  ... and {self.error_count - len(self.errors)} more")
        if len(self.feature_dims) > 1:
            lines.append("  rows disagree on the feature dim")
        if self.truncated_bytes:
            lines.append(
                f"  truncated last line ({self.truncated_bytes:,} bytes); drop it with `{repair_command(self.path)}`"
            )
        return "\n".join(lines)


def check_tsv(path: str | Path, max_errors: int = 20) -> TsvCheckReport:
    """Decode every row of a TSV and collect what is wrong (bad rows, boxes that are inverted or leave the image,
    duplicate img_ids, a truncated tail)."""
    report = TsvCheckReport(Path(path))
    first_line_of: dict[str, int] = {}
    with open(report.path, "rb", buffering=READ_BUFFER_BYTES) as handle:
        for line_no, _, line in iter_lines(handle):
            if not line.endswith(b"\n") and not is_complete_row(line):
                report.truncated_bytes = len(line)
            elif not is_blank(line):
                problem = _check_line(line, report, line_no, first_line_of)
                if problem:
                    report.error_count += 1
                    if len(report.errors) < max_errors:
                        report.errors.append(problem)
    return report


def _check_line(line: bytes, report: TsvCheckReport, line_no: int, first_line_of: dict[str, int]) -> str | None:
    try:
        feat = decode_row(line, path=report.path, line_no=line_no)
    except FeatureFileError as err:
        return str(err)
    if feat.img_id in first_line_of:
        return f"{report.path}:{line_no}: duplicate img_id {feat.img_id!r} (first on line {first_line_of[feat.img_id]})"
    first_line_of[feat.img_id] = line_no
    report.rows += 1
    report.feature_dims.add(int(feat.features.shape[1]))
    return None
