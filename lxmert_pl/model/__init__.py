"""LXRT model, heads and checkpoint loading."""

from lxmert_pl.model.config import PRESETS, LxrtConfig, get_preset
from lxmert_pl.model.heads import LxmertMatchingModel, MatchingOutput, cosine_max_score
from lxmert_pl.model.loading import CheckpointError, LxrtLoadReport, load_lxmert
from lxmert_pl.model.lxrt import LxrtModel, LxrtOutput

__all__ = [
    "PRESETS", "LxrtConfig", "get_preset", "LxmertMatchingModel", "MatchingOutput", "cosine_max_score",
    "CheckpointError", "LxrtLoadReport", "load_lxmert", "LxrtModel", "LxrtOutput",
]
