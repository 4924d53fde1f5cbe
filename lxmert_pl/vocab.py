"""Names of a detector's object classes and attributes: id -> display name, wherever a label is shown.

`load_vocabulary` finds them in this order:

1. **the detector's own vocabulary**: its config.yaml's `LXMERT_PL:` section (`OBJECTS:` / `ATTRIBUTES:`, each a list of
   names or a file name relative to the detector folder), or `objects_vocab.txt` / `attributes_vocab.txt` beside the
   config (the bundled demo detector carries its shapes and colours this way);
2. **Visual Genome's 1600 objects / 400 attributes** (bottom-up-attention's 1600-400-20 split, what the real
   detectors and LXMERT's obj36 features use; id i is line i of the file). They do not ship with lxmert_pl: they are
   read from `$LXMERT_PL_VG_VOCAB` (a folder), `../shared/vocab/`, or the checkpoints folder's `vg-1600-400/`, where
   the registry alias `vg-1600-400` downloads them (verified by sha256) on first use (not with
   `LXMERT_PL_NO_VOCAB_DOWNLOAD=1`);
3. **fallback labels** "class 123" / "attr 45", with ONE logged note saying how to get the names. A label is only a
   display: a missing vocabulary is never an error.

A line "name1,name2" (VG's synonyms, e.g. "stop sign,stopsign") shows its first name.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

VG_ALIAS = "vg-1600-400"
ENV_VG_VOCAB = "LXMERT_PL_VG_VOCAB"
ENV_NO_VOCAB_DOWNLOAD = "LXMERT_PL_NO_VOCAB_DOWNLOAD"  # "1": never try the download (offline machines, the tests)
OBJECTS_FILE = "objects_vocab.txt"
ATTRIBUTES_FILE = "attributes_vocab.txt"
VG_COUNTS = (1600, 400)
# The steering repo's shared folder (beside the repository), where a lead may place the VG files for everyone.
SHARED_VOCAB_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "vocab"
# The detector config's own section (the HF port ignores unknown sections; see detector/loading.py).
OWN_SECTION = "LXMERT_PL"
OBJECTS_KEY, ATTRIBUTES_KEY = "OBJECTS", "ATTRIBUTES"
FALLBACK_SOURCE = "none (fallback labels)"
DOWNLOAD_TIMEOUT_S = 5.0  # a label is only a display: an unreachable server must not hold a run up

_noted_fallback = False
_download_failed = False


@dataclass
class Vocabulary:
    """Object and attribute names by id; `source` says where they came from (a folder, a config, or the fallback)."""

    objects: list[str] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)
    source: str = FALLBACK_SOURCE

    def object_name(self, i: int) -> str:
        """Display name of object class `i` ("class 123" when unknown)."""
        return _display(self.objects, i, "class")

    def attribute_name(self, i: int) -> str:
        """Display name of attribute `i` ("attr 45" when unknown)."""
        return _display(self.attributes, i, "attr")

    def label(self, obj_id: int, attr_id: int | None = None, conf: float | None = None) -> str:
        """"red circle 0.93": attribute, object, confidence with 2 decimals (the parts given)."""
        parts = [] if attr_id is None or attr_id < 0 else [self.attribute_name(attr_id)]
        parts.append(self.object_name(obj_id))
        if conf is not None:
            parts.append(f"{conf:.2f}")
        return " ".join(parts)

    @property
    def is_fallback(self) -> bool:
        return not self.objects and not self.attributes


def _display(names: list[str], i: int, kind: str) -> str:
    i = int(i)
    if 0 <= i < len(names) and names[i]:
        return names[i].split(",")[0].strip()
    return f"{kind} {i}"


def read_names(path: str | Path) -> list[str]:
    """One name per line (VG's format); trailing blank lines dropped, ids are line numbers from 0."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def load_vocabulary(
    detector_dir: str | Path | None = None,
    detector_config: dict | None = None,
    *,
    download: bool = True,
) -> Vocabulary:
    """The vocabulary to show labels with (see the module docstring for the order).

    `detector_dir`: the detector folder (its config.yaml is read when `detector_config` is not given);
    `detector_config`: the parsed config.yaml. `download`: allow fetching VG's files (once per process; a failure
    falls back quietly to "class N" labels with one note).
    """
    own = _detector_vocabulary(Path(detector_dir) if detector_dir else None, detector_config)
    if own is not None:
        return own
    vg = visual_genome_vocabulary(download=download)
    if vg is not None:
        return vg
    _note_fallback()
    return Vocabulary()


def _detector_vocabulary(detector_dir: Path | None, config: dict | None) -> Vocabulary | None:
    """The detector's own names (config lists, files named in the config, or files beside it), or None."""
    if config is None and detector_dir is not None and (detector_dir / "config.yaml").is_file():
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: 10x faster, same result
        config = yaml.load((detector_dir / "config.yaml").read_text(encoding="utf-8"), Loader=loader)
    section = config.get(OWN_SECTION) if isinstance(config, dict) else None
    section = section if isinstance(section, dict) else {}
    objects = _names_from(section.get(OBJECTS_KEY), detector_dir)
    attributes = _names_from(section.get(ATTRIBUTES_KEY), detector_dir)
    where = f"detector config {detector_dir / 'config.yaml'}" if detector_dir else "detector config"
    if objects is None and attributes is None and detector_dir is not None:
        objects = _names_from(OBJECTS_FILE, detector_dir, missing_ok=True)
        attributes = _names_from(ATTRIBUTES_FILE, detector_dir, missing_ok=True)
        where = f"detector folder {detector_dir}"
    if objects is None and attributes is None:
        return None
    return Vocabulary(objects or [], attributes or [], where)


def _names_from(value: Any, folder: Path | None, missing_ok: bool = False) -> list[str] | None:
    """A list of names given inline, or read from a file (relative to `folder`)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [str(name) for name in value]
    path = Path(str(value))
    if not path.is_absolute() and folder is not None:
        path = folder / path
    if not path.is_file():
        if not missing_ok:
            logger.warning("vocabulary file %s named by the detector config is missing; labels fall back", path)
        return None
    return read_names(path)


def vg_search_dirs() -> list[Path]:
    """Where the VG files are looked for, in order: $LXMERT_PL_VG_VOCAB, ../shared/vocab, the checkpoints cache."""
    from lxmert_pl.registry import default_checkpoints_dir

    dirs = [Path(os.environ[ENV_VG_VOCAB]).expanduser()] if os.environ.get(ENV_VG_VOCAB) else []
    return dirs + [SHARED_VOCAB_DIR, default_checkpoints_dir() / VG_ALIAS]


def visual_genome_vocabulary(download: bool = True) -> Vocabulary | None:
    """VG's 1600 / 400 names from the first folder holding both files, else downloaded (registry alias
    `vg-1600-400`) when `download` allows, else None."""
    global _download_failed
    for folder in vg_search_dirs():
        if (folder / OBJECTS_FILE).is_file() and (folder / ATTRIBUTES_FILE).is_file():
            return Vocabulary(read_names(folder / OBJECTS_FILE), read_names(folder / ATTRIBUTES_FILE), str(folder))
    if not download or _download_failed or os.environ.get(ENV_NO_VOCAB_DOWNLOAD) == "1":
        return None
    from lxmert_pl.registry import RegistryError, default_checkpoints_dir, download_file, load_registry

    folder = default_checkpoints_dir() / VG_ALIAS
    try:
        for remote in load_registry()[VG_ALIAS].downloads:  # verified by size and sha256
            download_file(remote.url, default_checkpoints_dir() / remote.relpath, sha256=remote.sha256,
                          size=remote.size, progress=False, timeout=DOWNLOAD_TIMEOUT_S)
    except (RegistryError, OSError, KeyError) as err:
        _download_failed = True
        logger.info("could not download the Visual Genome vocabulary: %s", str(err).splitlines()[0])
        return None
    return Vocabulary(read_names(folder / OBJECTS_FILE), read_names(folder / ATTRIBUTES_FILE), str(folder))


def _note_fallback() -> None:
    global _noted_fallback
    if not _noted_fallback:
        _noted_fallback = True
        logger.warning(
            "no object/attribute vocabulary found: labels show as 'class N' / 'attr N'. To see Visual Genome's names, "
            "put %s and %s in a folder named by $%s (or let lxmert_pl download them: checkpoint alias %r)",
            OBJECTS_FILE, ATTRIBUTES_FILE, ENV_VG_VOCAB, VG_ALIAS)


__all__ = ["Vocabulary", "load_vocabulary", "visual_genome_vocabulary", "read_names", "VG_ALIAS", "ENV_VG_VOCAB"]
