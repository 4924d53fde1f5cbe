"""Provenance of extracted feature TSVs: the settings that made every row, kept beside the file as
`<file>.meta.json`, so that rows made otherwise are never appended to it (silent mixing).

`ExtractionSettings` records the detector (the name it was given by and the sha256 of its config and weights
files), the detector geometry, the box selection or the given boxes (with the sha256 of the boxes), the
precision, the test scale (shorter/longer side) and the lxmert_pl version. `claim_tsv` is called before rows are
added: a file without rows gets the sidecar; a file with rows must have a sidecar with the same settings, else
`ProvenanceMismatchError` lists the differing fields. A TSV without a sidecar (the released ones, files of older
versions) reads as before, but is never appended to: start a new file and read both (`--features A.tsv B.tsv`).

Compared are the fields that change a row's values: the detector's file hashes, geometry, selection, given boxes,
precision and test scale. The detector's name and the lxmert_pl version are recorded, not compared (the same weights
reached through an alias or a path make the same rows).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lxmert_pl import __version__
from lxmert_pl.features.errors import FeatureFileError, ProvenanceMismatchError
from lxmert_pl.fileio import write_atomically

SIDECAR_SUFFIX = ".meta.json"
SETTINGS_FORMAT = "lxmert_pl.extraction_settings"
SETTINGS_VERSION = 1
_NOT_COMPARED = ("detector", "lxmert_pl_version")
_HASH_CHUNK_BYTES = 8 << 20


def sha256_of_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(tsv_path: str | Path) -> Path:
    """`<file>.meta.json` beside the TSV."""
    tsv_path = Path(tsv_path)
    return tsv_path.with_name(tsv_path.name + SIDECAR_SUFFIX)


@dataclass(frozen=True)
class ExtractionSettings:
    """Everything that determines the rows an extraction writes (see the module docstring).

    The selection (`min_boxes`, `max_boxes`, `nms_thresh`, `conf_thresh`) is None when boxes are given.
    `given_boxes_sha256` is the sha256 of the given boxes (`detector.extraction.boxes_digest`: of their values, not of
    the file's formatting); None without them, or where boxes are keyed per image, as in the one-step cache. `geometry` and `precision`
    default to the detector's defaults, so that callers pass only what they set.
    """

    detector: str
    detector_sha256: dict[str, str]  # file name -> sha256 of the detector's config and weights files
    min_boxes: int | None
    max_boxes: int | None
    nms_thresh: float | None
    conf_thresh: float | None
    test_min_size: int
    test_max_size: int
    given_boxes: bool = False
    given_boxes_sha256: str | None = None
    geometry: str = "port"
    precision: str = "fp32"
    lxmert_pl_version: str = __version__

    def to_json(self) -> str:
        return json.dumps(
            {"format": SETTINGS_FORMAT, "version": SETTINGS_VERSION, **dataclasses.asdict(self)}, indent=2
        )

    @classmethod
    def from_json(cls, text: str, where: str = "settings") -> ExtractionSettings:
        """Raises FeatureFileError naming `where` for anything but version-1 settings."""
        try:
            content = json.loads(text)
        except ValueError as err:
            raise FeatureFileError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(content, dict) or content.get("format") != SETTINGS_FORMAT:
            raise FeatureFileError(f"{where}: not a {SETTINGS_FORMAT} file")
        if content.get("version") != SETTINGS_VERSION:
            raise FeatureFileError(f"{where}: settings version {content.get('version')!r}, expected {SETTINGS_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{key: value for key, value in content.items() if key in names})
        except TypeError as err:
            raise FeatureFileError(f"{where}: incomplete settings ({err})") from None

    def differences(self, other: ExtractionSettings) -> list[str]:
        """`field: self's value != other's value` for every compared field that differs (see the module docstring)."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in _NOT_COMPARED and getattr(self, f.name) != getattr(other, f.name)
        ]

    def describe(self) -> str:
        boxes = "given boxes" if self.given_boxes else f"{self.min_boxes}-{self.max_boxes} boxes"
        return (
            f"detector {self.detector} ({self.geometry}, {self.precision}, test size {self.test_min_size}/"
            f"{self.test_max_size}), {boxes}"
        )


def read_settings(tsv_path: str | Path) -> ExtractionSettings | None:
    """The settings recorded beside `tsv_path`, or None when it has no sidecar."""
    path = sidecar_path(tsv_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise FeatureFileError(f"{path}: cannot read ({err})") from None
    return ExtractionSettings.from_json(text, str(path))


def write_settings(tsv_path: str | Path, settings: ExtractionSettings) -> None:
    write_atomically(sidecar_path(tsv_path), settings.to_json() + "\n")


def claim_tsv(tsv_path: str | Path, settings: ExtractionSettings, *, has_rows: bool) -> None:
    """Before rows made with `settings` are added to `tsv_path`: record the settings (a file without rows), or
    check that the recorded ones are the same (a file with rows). Raises ProvenanceMismatchError otherwise."""
    tsv_path = Path(tsv_path)
    if not has_rows:
        write_settings(tsv_path, settings)
        return
    try:
        recorded = read_settings(tsv_path)
    except FeatureFileError as err:
        raise ProvenanceMismatchError(
            f"{tsv_path} holds rows, but its settings file is unusable ({err}); write to a new file"
        ) from None
    if recorded is None:
        raise ProvenanceMismatchError(
            f"{tsv_path} holds rows but has no {sidecar_path(tsv_path).name} recording the settings that made them "
            "(a released TSV or one written by an older version): adding rows could mix detectors or box settings. "
            "Write to a new file, and read both with --features OLD.tsv NEW.tsv"
        )
    differences = recorded.differences(settings)
    if differences:
        raise ProvenanceMismatchError(
            f"{tsv_path} was extracted with other settings ({sidecar_path(tsv_path)}); adding rows would mix them. "
            f"Differences (recorded != now): {'; '.join(differences)}. Rerun with the recorded settings, or write "
            "to a new file"
        )
