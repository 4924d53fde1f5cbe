"""Winoground from the Hugging Face Hub: `hf://datasets/facebook/winoground[@REVISION]`.

The dataset is gated: accept its terms on the Hub and set `HF_TOKEN` (or `hf auth login`). Its `data/examples.jsonl`
and `data/images.zip` come into the HF cache through `lxmert_pl.hub.fetch_hub_files` (offline use, resuming and
the error line as for checkpoints: `HF_HUB_OFFLINE=1` reads the cache only). The zip is unpacked once per commit
into `$XDG_CACHE_HOME/lxmert_pl/winoground/<commit>/` (default `~/.cache`), atomically (a folder renamed into place
when complete), and reused by later runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from lxmert_pl.errors import UserInputError
from lxmert_pl.hub import HUB_SCHEME, HubRef, fetch_hub_files

DATASET_PREFIX = HUB_SCHEME + "datasets/"
WINOGROUND_FILES = ("data/examples.jsonl", "data/images.zip")


def is_hub_dataset(data: str) -> bool:
    return str(data).startswith(DATASET_PREFIX)


def parse_dataset_ref(data: str, files: tuple[str, ...]) -> HubRef:
    body = str(data)[len(DATASET_PREFIX):]
    repo_id, _, revision = body.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserInputError(f"{data!r}: expected {DATASET_PREFIX}ORG/NAME[@REVISION]")
    return HubRef(repo_id=repo_id, revision=revision or "main", files=files, repo_type="dataset")


def extraction_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lxmert_pl" / "winoground"


def fetch_winoground(data: str) -> tuple[Path, Path]:
    """(examples.jsonl, image folder) of a Winoground repository on the Hub, fetched and unpacked as needed."""
    ref = parse_dataset_ref(data, WINOGROUND_FILES)
    snapshot, commit = fetch_hub_files(ref)
    examples, archive = (snapshot / name for name in WINOGROUND_FILES)
    return examples, unpack_images(archive, extraction_root() / commit)


def unpack_images(archive: Path, target: Path) -> Path:
    """The image folder of `archive` unpacked at `target` (done once; a half-unpacked folder never stays)."""
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(temp)
            os.replace(temp, target)
        except OSError:
            if not target.is_dir():  # else another process unpacked it first
                raise
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    nested = target / "images"
    return nested if nested.is_dir() else target
