"""Hub checkpoints through huggingface_hub, without network: a pre-populated HF cache in a temporary HF_HOME.

huggingface_hub reads HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE when it is imported, so every resolution runs in a
fresh Python process with the environment set (`resolve_in_subprocess`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lxmert_pl.hub import HubRef, HubUnavailableError, looks_like_repo_id, parse_hub_ref
from lxmert_pl.model import LxmertMatchingModel, get_preset
from lxmert_pl.model.loading import save_hf_directory
from lxmert_pl.registry import RegistryError, load_registry

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hf_cache(hub_cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Write the cache layout huggingface_hub keeps: blobs named by sha256, snapshot links, `refs/main`."""
    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


RESOLVE_SCRIPT = """
import json, sys
from lxmert_pl.registry import resolve_checkpoint, RegistryError
out = {}
for name in sys.argv[2:]:
    try:
        r = resolve_checkpoint(name, registry=sys.argv[1], progress=False)
        out[name] = {"path": str(r.path), "alias": r.alias, "format": r.format, "source": r.source,
                     "describe": r.describe()}
    except RegistryError as err:
        out[name] = {"error": type(err).__name__, "message": str(err)}
print(json.dumps(out))
"""


def resolve_in_subprocess(env: dict[str, str], registry: Path, *names: str) -> dict[str, dict]:
    """Resolve `names` in a fresh process whose environment adds `env` (HF variables set before the import)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    proc = subprocess.run([sys.executable, "-c", RESOLVE_SCRIPT, str(registry), *names], cwd=REPO_ROOT,
                          env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_hf_files(tmp_path_factory) -> dict[str, bytes]:
    """config.json + pytorch_model.bin of a tiny LXMERT in transformers' layout."""
    torch.manual_seed(0)
    directory = save_hf_directory(LxmertMatchingModel(get_preset("tiny")), tmp_path_factory.mktemp("tiny_hf"))
    return {name: (directory / name).read_bytes() for name in ("config.json", "pytorch_model.bin")}


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"tiny-hub": {
        "format": "hf", "description": "tiny test model on the hub",
        "hub": {"repo": "org/tiny-lxmert", "revision": "main", "files": ["config.json", "pytorch_model.bin"]},
    }}), encoding="utf-8")
    return path


@pytest.mark.parametrize("cache_variable", ["HF_HOME", "HF_HUB_CACHE"])
def test_prepopulated_cache_resolves_offline(tmp_path: Path, registry: Path, tiny_hf_files, cache_variable: str):
    hub_cache = tmp_path / "hf" / "hub"
    snapshot = populate_hf_cache(hub_cache, "org/tiny-lxmert", tiny_hf_files)
    env = {"HF_HUB_OFFLINE": "1",
           cache_variable: str(hub_cache.parent if cache_variable == "HF_HOME" else hub_cache)}
    names = ("tiny-hub", "hf://org/tiny-lxmert", "org/tiny-lxmert", f"hf://org/tiny-lxmert@{COMMIT}")
    results = resolve_in_subprocess(env, registry, *names)
    for name in names:
        assert results[name].get("path") == str(snapshot), (name, results[name])
        assert results[name]["source"] == f"hf://org/tiny-lxmert@{COMMIT}"
    assert (results["tiny-hub"]["alias"], results["tiny-hub"]["format"]) == ("tiny-hub", "hf")
    assert results["hf://org/tiny-lxmert"]["alias"] is None
    assert f"hf://org/tiny-lxmert@{COMMIT} (in the HF cache" in results["tiny-hub"]["describe"]

    from lxmert_pl.model import load_lxmert  # the snapshot folder is an ordinary HF directory for the loader

    model, report = load_lxmert(Path(results["tiny-hub"]["path"]), require=("matching",))
    assert report.format == "hf" and not report.ignored and model.config == get_preset("tiny")


def test_empty_cache_offline_fails_with_one_clear_line(tmp_path: Path, registry: Path, tiny_hf_files):
    populate_hf_cache(tmp_path / "hf" / "hub", "org/other", tiny_hf_files)  # a cache, but not of this repo
    results = resolve_in_subprocess({"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}, registry,
                                    "tiny-hub", "hf://org/missing@v1.0")
    alias, ref = results["tiny-hub"], results["hf://org/missing@v1.0"]
    assert alias["error"] == ref["error"] == "CheckpointUnavailableError"
    message = alias["message"]
    assert "\n" not in message and message.startswith("checkpoint 'tiny-hub': cannot get config.json, "
                                                      "pytorch_model.bin of hf://org/tiny-lxmert@main")
    assert "HF_HUB_OFFLINE=1" in message and str(tmp_path / "hf" / "hub") in message
    assert "`hf download org/tiny-lxmert config.json pytorch_model.bin --revision main`" in message
    assert "pass that folder instead" in message
    assert "\n" not in ref["message"] and "hf://org/missing@v1.0" in ref["message"]
    assert "`hf download org/missing --revision v1.0`" in ref["message"]


def test_missing_file_of_a_cached_repo_is_named(tmp_path: Path, registry: Path, tiny_hf_files):
    populate_hf_cache(tmp_path / "hf" / "hub", "org/tiny-lxmert", {"config.json": tiny_hf_files["config.json"]})
    results = resolve_in_subprocess({"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}, registry,
                                    "tiny-hub", "hf://org/tiny-lxmert")
    assert results["tiny-hub"]["error"] == "CheckpointUnavailableError"
    assert "cannot get config.json, pytorch_model.bin" in results["tiny-hub"]["message"]
    # Without a file list, the cached snapshot is searched for a weights file: there is none, and the message says
    # that the cache is incomplete (not that the repo has no weights).
    assert ("the HF cache's copy of hf://org/tiny-lxmert@main is incomplete: it has config.json but none of the "
            "weight files (model.safetensors, pytorch_model.bin)") in results["hf://org/tiny-lxmert"]["message"]


@pytest.mark.parametrize("text, expected", [
    ("hf://unc-nlp/lxmert-base-uncased", HubRef("unc-nlp/lxmert-base-uncased", "main")),
    ("hf://org/name@" + COMMIT, HubRef("org/name", COMMIT)),
    ("org/name@refs/pr/3", HubRef("org/name", "refs/pr/3")),
    ("org/name", HubRef("org/name", "main")),
    ("outputs/best.ckpt", None),  # a mistyped local file, not a repo
    ("runs/model.safetensors", None),
    ("lxr955", None),
    ("a/b/c", None),
    ("./org/name", None),
])
def test_parse_hub_ref(text: str, expected: HubRef | None) -> None:
    assert parse_hub_ref(text) == expected
    if expected is not None:
        assert expected.pinned == (expected.revision == COMMIT)


def test_malformed_hf_reference_is_an_error() -> None:
    assert not looks_like_repo_id("no-slash")
    with pytest.raises(HubUnavailableError, match="expected hf://ORG/NAME"):
        parse_hub_ref("hf://no-slash")


@pytest.mark.parametrize("entry, problem", [
    ({"format": "hf", "description": "d", "hub": {"repo": "org/x"}}, "revision"),
    ({"format": "hf", "description": "d", "hub": {"repo": "not a repo", "revision": "main"}}, "ORG/NAME"),
    ({"format": "hf", "description": "d", "hub": {"repo": "org/x", "revision": "main", "files": "config.json"}},
     "list of file names"),
    ({"format": "hf", "description": "d", "hub": {"repo": "org/x", "revision": "main"}, "source": "http://h/x"},
     "not both"),
    ({"file": "x", "format": "hf", "description": "d",
      "source": "https://huggingface.co/org/x/resolve/main/pytorch_model.bin"}, "hub: {repo, revision, files}"),
])
def test_malformed_hub_entry_is_rejected(tmp_path: Path, entry: dict, problem: str) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"bad": entry}), encoding="utf-8")
    with pytest.raises(RegistryError, match=problem.replace("{", r"\{").replace("}", r"\}")):
        load_registry(path)


def test_repository_hub_aliases() -> None:
    entries = load_registry()
    expected = {
        "lxmert-base-uncased": ("unc-nlp/lxmert-base-uncased", ("config.json", "pytorch_model.bin")),
        "lxmert-vqa-uncased": ("unc-nlp/lxmert-vqa-uncased", ("config.json", "pytorch_model.bin")),
        "frcnn-vg-finetuned": ("unc-nlp/frcnn-vg-finetuned", ("config.yaml", "pytorch_model.bin")),
    }
    for alias, (repo, files) in expected.items():
        hub = entries[alias].hub
        assert hub is not None and (hub.repo_id, hub.files) == (repo, files) and hub.revision
        assert not entries[alias].downloads
