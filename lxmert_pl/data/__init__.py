"""Data pipeline for image-text matching: dataset, collate, the unpadded distributed sampler, the DataModule."""

from lxmert_pl.data.datamodule import MatchingDataModule
from lxmert_pl.data.dataset import UNKNOWN_LABEL, MatchingDataset, MissingFeaturesError, collate_matching
from lxmert_pl.data.sampler import UnpaddedDistributedSampler

__all__ = [
    "UNKNOWN_LABEL",
    "MatchingDataModule",
    "MatchingDataset",
    "MissingFeaturesError",
    "UnpaddedDistributedSampler",
    "collate_matching",
]
