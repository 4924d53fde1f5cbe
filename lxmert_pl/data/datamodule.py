"""LightningDataModule for image-text matching: pair files + feature files -> batches.

Evaluation (`val`, `test`, `predict`) under several processes uses `UnpaddedDistributedSampler`: every pair is
seen exactly once, in input order within each rank. Lightning keeps that sampler whatever the Trainer's
`use_distributed_sampler` (it is a `DistributedSampler` subclass); `Trainer(use_distributed_sampler=False)` is
still the clearest setting, and is required when a subclass returns other samplers of its own. Training shuffles
(seeded by `lightning.seed_everything` through the global RNG, or `PL_GLOBAL_SEED` for the `DistributedSampler`
used under DDP).

Batches: see `collate_matching`. `batch["index"]` is each pair's position in its file's list, so
`datamodule.test_pairs[i]` is the pair behind `index == i` (`skip_missing` leaves pairs out, never renumbers).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from lxmert_pl.data.dataset import MatchingDataset, collate_matching
from lxmert_pl.data.sampler import UnpaddedDistributedSampler
from lxmert_pl.distributed import get_world_size
from lxmert_pl.features.sources import FeatureSource, open_feature_source
from lxmert_pl.pairs.io import Pair, load_pairs
from lxmert_pl.tokenizer import LxmertTokenizer

PairsArg = str | Path | Sequence[Pair] | None
SPLITS = ("train", "val", "test", "predict")
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
_SPLIT_STAGE = {"train": "fit", "val": "validate", "test": "test", "predict": "predict"}


class MatchingDataModule(pl.LightningDataModule):
    """Pairs (a file path or a list of `Pair`) per split, one feature source for all splits.

    `setup(stage)` loads the pairs of the stage's splits and checks up front that the source holds every img_id
    they need (see `MatchingDataset`). After it, `.train_pairs`/`.val_pairs`/`.test_pairs`/`.predict_pairs` hold
    the pairs as loaded and `.skipped` the pairs left out by `skip_missing=True`.
    """

    def __init__(
        self,
        features: str | Sequence[str] | None = None,
        test_pairs: PairsArg = None,
        predict_pairs: PairsArg = None,
        train_pairs: PairsArg = None,
        val_pairs: PairsArg = None,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        max_seq_length: int = 20,
        skip_missing: bool = False,
        cache_dir: str | Path | None = None,
        feature_source: FeatureSource | None = None,
        caption_source: str = "mscoco",
    ):
        super().__init__()
        if features is None and feature_source is None:
            raise ValueError("MatchingDataModule needs `features` (TSV files / store directories) or `feature_source`")
        self.features = features
        self.pair_args: dict[str, PairsArg] = {
            "train": train_pairs, "val": val_pairs, "test": test_pairs, "predict": predict_pairs,
        }  # fmt: skip
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.max_seq_length = max_seq_length
        self.skip_missing = skip_missing
        self.cache_dir = cache_dir
        self.caption_source = caption_source
        self.train_pairs: list[Pair] | None = None
        self.val_pairs: list[Pair] | None = None
        self.test_pairs: list[Pair] | None = None
        self.predict_pairs: list[Pair] | None = None
        self.datasets: dict[str, Dataset] = {}
        self._source = feature_source
        self._tokenizer: LxmertTokenizer | None = None

    @property
    def feature_source(self) -> FeatureSource:
        """The source given, or the one opened from `features` on first use (indexes are built then)."""
        if self._source is None:
            self._source = open_feature_source(self.features, cache_dir=self.cache_dir)
        return self._source

    @property
    def tokenizer(self) -> LxmertTokenizer:
        if self._tokenizer is None:
            self._tokenizer = LxmertTokenizer(max_seq_length=self.max_seq_length)
        return self._tokenizer

    @property
    def skipped(self) -> list[Pair]:
        """Pairs left out for want of features, over the splits set up so far (train, val, test, predict order)."""
        skipped: list[Pair] = []
        for split in SPLITS:
            if split in self.datasets:
                skipped += getattr(self.datasets[split], "skipped", [])
        return skipped

    def prepare_data(self) -> None:
        """Build or refresh the TSV indexes once per node (Lightning runs this on local rank 0 before `setup`)."""
        if self._source is None:
            open_feature_source(self.features, cache_dir=self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        splits = SPLITS if stage is None else _STAGE_SPLITS.get(stage)
        if splits is None:
            raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(_STAGE_SPLITS)} or None")
        for split in splits:
            if self.pair_args[split] is not None and split not in self.datasets:
                pairs = self._load_pairs(split)
                setattr(self, f"{split}_pairs", pairs)
                self.datasets[split] = self.make_dataset(split, pairs)

    def _load_pairs(self, split: str) -> list[Pair]:
        given = self.pair_args[split]
        if isinstance(given, (str, Path)):
            return load_pairs(given, caption_source=self.caption_source)
        pairs = list(given)
        if not all(isinstance(pair, Pair) for pair in pairs):
            raise TypeError(f"{split}_pairs must be a pair file path or a list of Pair")
        return pairs

    def make_dataset(self, split: str, pairs: list[Pair]) -> Dataset:
        """The dataset of one split; override to use another dataset for a split (e.g. training negatives).

        It must return items that `collate_matching` accepts, and expose `skipped` if it leaves pairs out.
        """
        return MatchingDataset(pairs, self.feature_source, self.tokenizer, skip_missing=self.skip_missing)

    def _dataset(self, split: str) -> Dataset:
        if split not in self.datasets:
            if self.pair_args[split] is None:
                raise ValueError(f"no {split}_pairs were given to MatchingDataModule")
            self.setup(_SPLIT_STAGE[split])
        return self.datasets[split]

    def _loader(self, dataset: Dataset, *, shuffle: bool, sampler: Sampler | None, persistent: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_matching,
            pin_memory=self.pin_memory,
            persistent_workers=persistent and self.num_workers > 0,
        )

    def _evaluation_loader(self, split: str, *, persistent: bool = False) -> DataLoader:
        dataset = self._dataset(split)
        sampler = UnpaddedDistributedSampler(dataset) if get_world_size() > 1 else None
        return self._loader(dataset, shuffle=False, sampler=sampler, persistent=persistent)

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train")
        if get_world_size() > 1:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            return self._loader(dataset, shuffle=False, sampler=DistributedSampler(dataset, seed=seed), persistent=True)
        return self._loader(dataset, shuffle=True, sampler=None, persistent=True)

    def val_dataloader(self) -> DataLoader:
        return self._evaluation_loader("val", persistent=True)

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._evaluation_loader("predict")
