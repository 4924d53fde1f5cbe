"""Errors of feature files (TSVs, their indexes and sidecars, binary stores); every message names the file."""

from __future__ import annotations

from collections.abc import Sequence

from lxmert_pl.errors import LxmertPlError, UserInputError


class FeatureFileError(UserInputError):
    """A feature file (TSV, index or store) is malformed; the message names the file and line or img_id."""


class TruncatedTsvError(FeatureFileError):
    """The TSV ends in a partial line (an interrupted write)."""


class StaleIndexError(FeatureFileError):
    """A TSV changed after its byte-offset index was built or loaded."""


class DuplicateImageIdError(FeatureFileError):
    """One img_id occurs twice in the rows of one feature source."""


class NotAFeatureTsvError(FeatureFileError):
    """A file given as a feature TSV (to append to or repair) is not one; it was left unmodified."""


class FeatureFileLockedError(FeatureFileError):
    """Another process is writing this feature file."""


class ProvenanceMismatchError(FeatureFileError):
    """Rows would be added to a TSV extracted with other settings (or with unknown settings)."""


class MissingImageError(LxmertPlError, KeyError):
    """An img_id that no feature source holds."""

    def __init__(self, img_id: str, searched: Sequence[str]):
        super().__init__(img_id, list(searched))  # both in `args`, so the error survives pickling
        self.img_id = img_id
        self.searched = list(searched)

    def __str__(self) -> str:
        return f"img_id {self.img_id!r} not found in {'; '.join(self.searched)}"


def repair_command(path: object) -> str:
    """The shell command that removes a truncated last line from `path`."""
    return f"python -m lxmert_pl.features repair {path}"
