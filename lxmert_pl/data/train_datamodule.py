"""Training data: labelled pairs as they are, or captions with negatives made on the fly, in a resumable order.

The order of each epoch depends only on (seed, epoch), and a run restored from a mid-epoch checkpoint skips the
batches its restored loop progress says were already trained, so it continues exactly where the checkpoint was taken.

A caption file (every pair a positive) becomes LXMERT's pretraining task: each epoch, with probability
`negative_ratio`, a pair's caption is replaced by a caption of another image (never one that is also a caption of
this image) and its label becomes 0 ("not matched"; 1 = matched). The choice is a function of (seed, epoch, pair),
so it is the same in every worker and after a resume.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from torch.utils.data import DataLoader, Dataset

from lxmert_pl.data.datamodule import MatchingDataModule
from lxmert_pl.data.dataset import MatchingDataset
from lxmert_pl.data.train_sampler import ResumableShuffleSampler
from lxmert_pl.errors import UserInputError
from lxmert_pl.pairs.io import Pair


def normalise_caption(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


class CaptionNegativesDataset(Dataset):
    """Wraps a dataset of positive pairs; replaces captions by other images' captions with `negative_ratio`."""

    def __init__(self, base: MatchingDataset, negative_ratio: float = 0.5, seed: int = 0):
        if not 0.0 <= negative_ratio <= 1.0:
            raise UserInputError(f"negative_ratio must lie in [0, 1], got {negative_ratio}")
        self.base, self.negative_ratio, self.seed = base, negative_ratio, seed
        self.epoch = 0
        self.captions_of: dict[str, set[str]] = {}
        for pair in base.pairs:
            self.captions_of.setdefault(pair.img_id, set()).add(normalise_caption(pair.sent))
        if len(self.captions_of) < 2 and negative_ratio > 0:
            raise UserInputError("negatives need captions of at least two images")
        self.skipped = base.skipped

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, position: int) -> dict:
        item = self.base[position]
        rng = random.Random(f"{self.seed}/{self.epoch}/{position}")
        if rng.random() >= self.negative_ratio:
            return item
        own = self.captions_of[item["img_id"]]
        for _ in range(100):
            other = self.base.pairs[rng.randrange(len(self.base.pairs))]
            if other.img_id != item["img_id"] and normalise_caption(other.sent) not in own:
                break
        else:
            return item  # only this image's captions found: keep the positive
        tokens = self.base.tokenizer([other.sent])
        item.update(sent=other.sent, input_ids=tokens["input_ids"][0], attention_mask=tokens["attention_mask"][0],
                    token_type_ids=tokens["token_type_ids"][0], label=0)
        return item


def is_caption_set(pairs: Sequence[Pair]) -> bool:
    """Positives only (a caption file): negatives must be made. Unlabelled pairs cannot train."""
    unlabelled = [p for p in pairs if p.label is None]
    if unlabelled:
        raise UserInputError(f"{len(unlabelled)} training pairs have no label (e.g. pair #{unlabelled[0].index}); "
                             "training needs labelled pairs or captions")
    return all(p.label == 1 for p in pairs)


def check_validation_pairs(pairs: Sequence[Pair]) -> None:
    """Validation during training ranks epochs by ROC-AUC: it needs labelled pairs of both classes."""
    labels = {p.label for p in pairs if p.label is not None}
    if not labels:
        raise UserInputError(f"the validation pairs ({len(pairs)}) have no labels: validation during training "
                             "needs labelled pairs (1 = matched, 0 = not matched); give labelled pairs to --val, "
                             "or leave --val out")
    if len(labels) < 2:
        raise UserInputError(f"the labelled validation pairs are all label {labels.pop()}: ROC-AUC, by which "
                             "best.ckpt is chosen, needs matched (1) and unmatched (0) pairs")


class TrainingDataModule(MatchingDataModule):
    """`MatchingDataModule` with on-the-fly negatives for caption files and an exactly resumable train order."""

    def __init__(self, *args, negative_ratio: float = 0.5, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.negative_ratio, self.seed = negative_ratio, seed
        self.train_sampler: ResumableShuffleSampler | None = None

    def make_dataset(self, split: str, pairs: list[Pair]) -> Dataset:
        dataset = super().make_dataset(split, pairs)
        if split == "train" and is_caption_set(dataset.pairs):
            return CaptionNegativesDataset(dataset, self.negative_ratio, self.seed)
        if split == "val":
            check_validation_pairs(dataset.pairs)
        return dataset

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train")
        sampler = ResumableShuffleSampler(len(dataset), seed=self.seed)
        skip = self.batches_already_trained()
        if skip:  # resumed mid-epoch: continue the epoch where the checkpoint left it
            sampler.set_epoch(self.trainer.current_epoch)
            sampler.skip_first(skip * self.batch_size)
        if isinstance(dataset, CaptionNegativesDataset):
            set_sampler_epoch = sampler.set_epoch

            def set_epoch(epoch: int) -> None:  # the dataset's negatives follow the sampler's epoch
                set_sampler_epoch(epoch)
                dataset.set_epoch(epoch)

            sampler.set_epoch = set_epoch  # type: ignore[method-assign]
            dataset.set_epoch(sampler.epoch)
        self.train_sampler = sampler
        return self._loader(dataset, shuffle=False, sampler=sampler, persistent=False)

    def val_dataloader(self):
        """No validation pairs: no validation (Lightning takes an empty list as "skip")."""
        return super().val_dataloader() if self.pair_args["val"] is not None else []

    def batches_already_trained(self) -> int:
        """Batches of the epoch a restored run continues that were trained before its checkpoint (0 for a fresh run).

        Read from the loop progress Lightning restored (not derived from the global step, which miscounts once
        an epoch's last optimizer step gathers fewer batches than `accumulate_grad_batches`): a checkpoint written
        at the end of an epoch (processed > completed) continues with the next epoch from its first batch; one
        written after batch k of an unfinished epoch continues that epoch after its k-th batch.
        """
        trainer = self.trainer
        if trainer is None:
            return 0
        epochs = trainer.fit_loop.epoch_progress.current
        if epochs.processed > epochs.completed:  # the restored epoch ran to its end
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def batches_per_epoch(self) -> int:
        """Training batches per epoch and process (the sampler rounds the split over processes up)."""
        world = self.trainer.world_size if self.trainer is not None else 1
        per_process = -(-len(self._dataset("train")) // world)
        return -(-per_process // self.batch_size)
