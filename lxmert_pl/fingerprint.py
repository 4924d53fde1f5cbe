"""What made a result: one small JSON-able record of the weights, the feature sources and the settings, and the
list of what changed between two such records.

Every resumable or cached result keeps the record of the run that made it and compares it with the rerun's before
reusing anything (retrieval blocks, `train.py`'s `last.ckpt`, extraction shards and the one-step image cache through
the detector's file hashes, and any later disk cache):

    record = fingerprint(weights_path, feature_paths, {"mode": "itm", "k": 128})
    changes = compare(saved_record, record)      # ["weights.sha256: 3fa1... -> 9c0d...", "settings.k: 128 -> 64"]

- Weights are identified by the sha256 of their files' content (a folder: of each weights/config file in it). A hash is
  computed once and cached by path + size + mtime_ns + inode (`file_sha256`, in `$XDG_CACHE_HOME/lxmert_pl/sha256.json`,
  written atomically), so a rerun does not read 900 MB again; a file replaced at the same path (even with the same
  size) has another mtime or inode and is hashed anew.
- Feature files by what can be had without reading every byte: a TSV by its size, mtime_ns, the digest of its row
  index (img_ids and where each row lies) and its provenance sidecar (`<file>.meta.json`: the detector and its
  settings), when it has one; a binary store by its `meta.json`, size and mtime; an image folder by the names, sizes
  and mtimes of its files.
- Settings: whatever the caller passes (plain JSON values), every setting that changes a score.

`path` entries are kept for the reader and never compared: the same weights or features reached by another path (an
alias, a copy) make the same result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lxmert_pl.fileio import write_atomically

logger = logging.getLogger(__name__)

FORMAT = "lxmert_pl.fingerprint"
VERSION = 1
NOT_COMPARED = ("path",)
# Files of a weights folder that are part of the weights (a model card beside them is not).
WEIGHTS_SUFFIXES = (".bin", ".safetensors", ".pth", ".pt", ".ckpt", ".json", ".yaml", ".yml", ".caffemodel",
                    ".prototxt", ".pkl", ".npz")
_CHUNK = 8 << 20


# ---- the sha256 of a file, cached ----------------------------------------------------------------------------------
def hash_cache_path() -> Path:
    """`$LXMERT_PL_HASH_CACHE`, else `$XDG_CACHE_HOME/lxmert_pl/sha256.json` (default `~/.cache/...`)."""
    if os.environ.get("LXMERT_PL_HASH_CACHE"):
        return Path(os.environ["LXMERT_PL_HASH_CACHE"])
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "lxmert_pl" / "sha256.json"


def _read_hash_cache(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _stamp(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def file_sha256(path: str | Path) -> str:
    """The sha256 of the file's content; read from the hash cache while the file's size, mtime_ns and inode are
    those it was hashed with, else computed (and cached: a cache that cannot be written is only slower)."""
    path = Path(path).resolve()
    stamp = _stamp(path.stat())
    cache_path = hash_cache_path()
    entry = _read_hash_cache(cache_path).get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    if _stamp(path.stat()) != stamp:  # changed while it was read: do not cache a hash of a mix
        return digest.hexdigest()
    cache = _read_hash_cache(cache_path)  # re-read: another process may have added entries meanwhile
    cache = {name: entry for name, entry in cache.items() if os.path.exists(name)}  # files deleted since: dropped
    cache[str(path)] = {"stamp": stamp, "sha256": digest.hexdigest()}
    try:
        write_atomically(cache_path, json.dumps(cache, indent=0, sort_keys=True) + "\n")
    except OSError as err:
        logger.debug("cannot write the hash cache %s: %s", cache_path, err)
    return digest.hexdigest()


# ---- records -------------------------------------------------------------------------------------------------------
def weights_record(path: str | Path) -> dict[str, Any]:
    """{"path", "sha256"} of a weights file; {"path", "files": {name: sha256}} of a weights folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHTS_SUFFIXES)
        return {"path": str(path), "files": {p.name: file_sha256(p) for p in files}}
    return {"path": str(path), "sha256": file_sha256(path)}


def _tsv_record(path: Path) -> dict[str, Any]:
    from lxmert_pl.features.index import load_or_build_index
    from lxmert_pl.features.provenance import read_settings

    stat = path.stat()
    index, _ = load_or_build_index(path)
    digest = hashlib.sha256()
    digest.update("\n".join(index.img_ids).encode("utf-8"))
    digest.update(index.offsets.tobytes() + index.lengths.tobytes())
    try:
        settings = read_settings(path)
    except Exception:  # an unreadable sidecar: the other fields still identify the file
        settings = None
    provenance = None
    if settings is not None:
        provenance = json.loads(settings.to_json())
        for key in ("format", "version", "detector", "lxmert_pl_version"):  # not what made the rows
            provenance.pop(key, None)
    return {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "index_sha256": digest.hexdigest(), "provenance": provenance}


def _folder_record(path: Path) -> dict[str, Any]:
    """A binary feature store (by its meta.json) or any other folder (an image folder) by its files' stats."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    listing = hashlib.sha256()
    for item in files:
        stat = item.stat()
        listing.update(f"{item.relative_to(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode("utf-8"))
    record: dict[str, Any] = {"path": str(path), "files": len(files), "bytes": sum(p.stat().st_size for p in files),
                              "listing_sha256": listing.hexdigest()}
    if (path / "meta.json").is_file():
        record["meta_sha256"] = file_sha256(path / "meta.json")
    return record


def features_record(path: str | Path) -> dict[str, Any]:
    """What identifies one feature source (a TSV, a store, an image folder) without reading all of it."""
    path = Path(path)
    if path.is_dir():
        return _folder_record(path)
    if not path.exists():
        return {"path": str(path), "missing": True}
    return _tsv_record(path)


def feature_paths(sources: Sequence[Any]) -> list[Path]:
    """The files behind feature sources given as paths or as opened sources (`TsvReader`, `FeatureStore`,
    `MergedFeatureSource`), in order."""
    paths: list[Path] = []
    for source in sources:
        if isinstance(source, (str, Path)):
            paths.append(Path(source))
        elif hasattr(source, "sources"):
            paths += feature_paths(source.sources)
        elif hasattr(source, "directory"):
            paths.append(Path(source.directory))
        elif hasattr(source, "path"):
            paths.append(Path(source.path))
        else:
            raise TypeError(f"cannot tell which files make the feature source {source!r}")
    return paths


def fingerprint(weights: str | Path | None, features: Sequence[Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The record of what makes a result (see the module docstring); plain JSON values. `features`: paths or
    opened feature sources (see `feature_paths`)."""
    return {"format": FORMAT, "version": VERSION,
            "weights": None if weights is None else weights_record(weights),
            "features": [features_record(p) for p in feature_paths(features)],
            "settings": json.loads(json.dumps(dict(settings), default=str))}


# ---- comparison ----------------------------------------------------------------------------------------------------
def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."  # a sha256
    return text if len(text) <= 80 else text[:77] + "..."


def _diff(old: Any, new: Any, where: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if key in NOT_COMPARED:
                continue
            _diff(old.get(key), new.get(key), f"{where}.{key}" if where else str(key), out)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for position, (a, b) in enumerate(zip(old, new)):
            _diff(a, b, f"{where}[{position}]", out)
    elif isinstance(old, list) and isinstance(new, list):
        out.append(f"{where}: {len(old)} -> {len(new)} entries")
    elif old != new:
        out.append(f"{where}: {_short(old)} -> {_short(new)}")


def compare(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """`what: old -> new` for every compared entry that differs (paths are not compared); [] when the same."""
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        return ["record: none or of an older version -> this version's (cannot tell what made the old result)"]
    out: list[str] = []
    _diff({k: v for k, v in old.items() if k not in ("format",)}, {k: v for k, v in new.items() if k != "format"},
          "", out)
    return out
