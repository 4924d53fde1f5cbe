"""Matching dataset, collate, unpadded distributed sampler and the DataModule (workers, DDP, missing features)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from helpers_features import raw_tsv_line, write_synthetic_tsv
from torch.utils.data import DistributedSampler, RandomSampler

from lxmert_pl.data import (
    MatchingDataModule,
    MatchingDataset,
    MissingFeaturesError,
    UnpaddedDistributedSampler,
    collate_matching,
)
from lxmert_pl.features.sources import open_feature_source
from lxmert_pl.features import FeatureFileError
from lxmert_pl.pairs.io import Pair
from lxmert_pl.tokenizer import LxmertTokenizer

DIM = 8
BOX_COUNTS = [3, 5, 1, 4, 2, 6, 3]


@pytest.fixture(scope="module")
def tokenizer() -> LxmertTokenizer:
    return LxmertTokenizer()


@pytest.fixture
def feature_tsv(tmp_path: Path):
    img_ids = [f"img{i}" for i in range(len(BOX_COUNTS))]
    records = write_synthetic_tsv(tmp_path / "feats.tsv", img_ids, num_boxes=BOX_COUNTS, dim=DIM)
    return tmp_path / "feats.tsv", {record.img_id: record for record in records}


def make_pairs(num_pairs: int, num_images: int = len(BOX_COUNTS)) -> list[Pair]:
    labels = [1, 0, None]
    return [
        Pair(index=i, question_id=1000 + i, img_id=f"img{(i * 3) % num_images}", sent=f"a photo of thing {i}",
             label=labels[i % 3], extra={})
        for i in range(num_pairs)
    ]  # fmt: skip


def write_pairs_json(path: Path, pairs: list[Pair]) -> Path:
    ground = {1: "True", 0: "False"}
    entries = [{"question_id": p.question_id, "img_id": p.img_id, "sent": p.sent} for p in pairs]
    for entry, pair in zip(entries, pairs):
        if pair.label is not None:
            entry["ground"] = ground[pair.label]
    path.write_text(json.dumps(entries))
    return path


def all_indices(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch["index"]]


# ----------------------------------------------------------------------------------------------- dataset


def test_item_holds_tokens_features_normalised_boxes_and_label(feature_tsv, tokenizer):
    path, records = feature_tsv
    pairs = make_pairs(6)
    dataset = MatchingDataset(pairs, open_feature_source(path), tokenizer)
    item = dataset[4]
    record = records[pairs[4].img_id]
    tokens = tokenizer([pairs[4].sent])
    assert (item["index"], item["img_id"], item["sent"], item["label"]) == (4, "img5", "a photo of thing 4", 0)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(item[key], tokens[key][0]) and item[key].shape == (20,)
    assert item["features"].dtype == torch.float32 and np.array_equal(item["features"].numpy(), record.features)
    expected_boxes = record.boxes / np.array([record.img_w, record.img_h, record.img_w, record.img_h], np.float32)
    assert np.array_equal(item["boxes"].numpy(), expected_boxes)
    assert item["boxes"].min() >= 0 and item["boxes"].max() <= 1
    assert dataset[2]["label"] == -1


def test_boxes_outside_the_image_name_the_img_id(tmp_path, tokenizer):
    """A row whose boxes leave the image (written by another tool: our writer refuses it) is refused on read,
    naming the file, line and img_id."""
    records = write_synthetic_tsv(tmp_path / "f.tsv", ["fine", "wide"], num_boxes=2, dim=DIM)
    bad = records[1]
    bad.boxes = bad.boxes.copy()
    bad.boxes[0, 2] = bad.img_w * 1.01
    (tmp_path / "f.tsv").write_text(raw_tsv_line(records[0]) + raw_tsv_line(bad))
    pairs = [Pair(0, 0, "fine", "ok", 1), Pair(1, 1, "wide", "too wide", 1)]
    dataset = MatchingDataset(pairs, open_feature_source(tmp_path / "f.tsv"), tokenizer)
    dataset[0]
    with pytest.raises(FeatureFileError, match=r"f.tsv:2 \(img_id 'wide'\): box 0 .* leaves the image"):
        dataset[1]


def test_collate_pads_variable_box_counts(feature_tsv, tokenizer):
    path, records = feature_tsv
    pairs = make_pairs(3)  # images img0 (3 boxes), img3 (4), img6 (3)
    dataset = MatchingDataset(pairs, open_feature_source(path), tokenizer)
    batch = collate_matching([dataset[i] for i in range(3)])
    assert batch["index"].tolist() == [0, 1, 2] and batch["index"].dtype == torch.long
    assert batch["img_id"] == ["img0", "img3", "img6"] and batch["sent"][1] == "a photo of thing 1"
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape == (3, 20)
    assert batch["features"].shape == (3, 4, DIM) and batch["boxes"].shape == (3, 4, 4)
    assert batch["box_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["box_mask"].dtype == torch.long
    assert torch.count_nonzero(batch["features"][0, 3]) == 0 and torch.count_nonzero(batch["boxes"][2, 3]) == 0
    assert np.array_equal(batch["features"][1].numpy(), records["img3"].features)
    assert batch["labels"].tolist() == [1, 0, -1]


def test_collate_refuses_mixed_feature_dims(feature_tsv, tokenizer):
    path, _ = feature_tsv
    item = MatchingDataset(make_pairs(1), open_feature_source(path), tokenizer)[0]
    wider = {**item, "img_id": "wide", "features": torch.zeros(2, DIM + 1)}
    with pytest.raises(ValueError, match=r"different dims in one batch: dim 8 \(img_id 'img0'\), dim 9 \(img_id 'wide"):
        collate_matching([item, wider])


def test_missing_images_are_an_error_listing_count_and_first_ids(feature_tsv, tokenizer):
    path, _ = feature_tsv
    pairs = make_pairs(4) + [Pair(4 + i, 4 + i, f"gone{i}", "a sentence", 1) for i in range(7)]
    with pytest.raises(
        MissingFeaturesError,
        match=r"7 of 11 pairs name 7 img_id\(s\) with no features in TSV file .*"
        r"'gone0', 'gone1', 'gone2', 'gone3', 'gone4' and 2 more; pass skip_missing=True",
    ):
        MatchingDataset(pairs, open_feature_source(path), tokenizer)


def test_skip_missing_counts_logs_and_keeps_the_skipped(feature_tsv, tokenizer, caplog):
    path, _ = feature_tsv
    pairs = make_pairs(4) + [Pair(4, 4, "gone", "a sentence", 1), Pair(5, 5, "gone", "again", 0)]
    with caplog.at_level(logging.WARNING, logger="lxmert_pl.data.dataset"):
        dataset = MatchingDataset(pairs, open_feature_source(path), tokenizer, skip_missing=True)
    assert len(dataset) == 4 and [p.index for p in dataset.skipped] == [4, 5]
    assert "skipping 2 of 6 pairs name 1 img_id(s) with no features" in caplog.text


def test_programmatic_empty_sentence_names_the_pair(feature_tsv, tokenizer):
    path, _ = feature_tsv
    with pytest.raises(ValueError, match=r"pair #7 \(img_id 'img0'\): empty or whitespace-only sentence"):
        MatchingDataset([Pair(7, 7, "img0", "  ", 1)], open_feature_source(path), tokenizer)


# ----------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("size", [0, 1, 2, 7, 10, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_unpadded_sampler_partitions_without_duplicates(size, world_size):
    shards = [list(UnpaddedDistributedSampler(range(size), num_replicas=world_size, rank=r)) for r in range(world_size)]
    assert [i for shard in shards for i in shard] == list(range(size))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for rank, shard in enumerate(shards):
        assert shard == list(range(rank * size // world_size, (rank + 1) * size // world_size))
        assert len(UnpaddedDistributedSampler(range(size), num_replicas=world_size, rank=rank)) == len(shard)


def test_unpadded_sampler_follows_the_process_group(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 2)
    assert list(UnpaddedDistributedSampler(range(10))) == [6, 7, 8, 9]
    assert isinstance(UnpaddedDistributedSampler(range(10)), DistributedSampler)


# ----------------------------------------------------------------------------------------------- datamodule


def test_test_loader_gives_every_pair_once_in_order(feature_tsv, tmp_path):
    path, _ = feature_tsv
    pairs_path = write_pairs_json(tmp_path / "matching_test.json", make_pairs(11))
    dm = MatchingDataModule(features=str(path), test_pairs=pairs_path, batch_size=4, pin_memory=False)
    dm.setup("test")
    assert [p.question_id for p in dm.test_pairs] == list(range(1000, 1011))
    loader = dm.test_dataloader()
    assert all_indices(loader) == list(range(11))
    assert [len(batch["index"]) for batch in loader] == [4, 4, 3]
    assert dm.skipped == []


def test_eval_loaders_shard_without_padding_under_distributed(feature_tsv, monkeypatch):
    path, _ = feature_tsv
    dm = MatchingDataModule(features=str(path), test_pairs=make_pairs(11), predict_pairs=make_pairs(5), batch_size=2)
    dm.setup("test")
    dm.setup("predict")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    seen_test, seen_predict = [], []
    for rank in range(3):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, rank=rank: rank)
        test_loader = dm.test_dataloader()
        assert isinstance(test_loader.sampler, UnpaddedDistributedSampler)
        seen_test += all_indices(test_loader)
        seen_predict += all_indices(dm.predict_dataloader())
    assert seen_test == list(range(11)) and seen_predict == list(range(5))


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")
def test_workers_and_pinned_memory_give_the_same_batches(feature_tsv):
    path, _ = feature_tsv
    pairs = make_pairs(13)
    single = MatchingDataModule(features=str(path), test_pairs=pairs, batch_size=3, num_workers=0, pin_memory=False)
    workers = MatchingDataModule(features=str(path), test_pairs=pairs, batch_size=3, num_workers=2, pin_memory=True)
    batches = list(zip(single.test_dataloader(), workers.test_dataloader()))
    assert len(batches) == 5
    for expected, got in batches:
        assert expected["img_id"] == got["img_id"]
        for key in ("index", "input_ids", "features", "boxes", "box_mask", "labels"):
            assert torch.equal(expected[key], got[key]), key


def test_skip_missing_in_the_datamodule(feature_tsv):
    path, _ = feature_tsv
    pairs = make_pairs(3) + [Pair(3, 3, "absent", "some sentence", 0)] + make_pairs(5)[3:]
    for offset, pair in enumerate(pairs[4:]):
        pair.index = 4 + offset
    dm = MatchingDataModule(features=str(path), test_pairs=pairs, skip_missing=True, batch_size=10)
    dm.setup("test")
    assert [p.img_id for p in dm.skipped] == ["absent"] and len(dm.test_pairs) == 6
    assert all_indices(dm.test_dataloader()) == [0, 1, 2, 4, 5]
    strict = MatchingDataModule(features=str(path), test_pairs=pairs)
    with pytest.raises(MissingFeaturesError, match="1 of 6 pairs name 1 img_id"):
        strict.setup("test")


def test_prepare_data_builds_the_index(feature_tsv):
    path, _ = feature_tsv
    dm = MatchingDataModule(features=str(path), test_pairs=make_pairs(2))
    assert not Path(f"{path}.idx").exists()
    dm.prepare_data()
    assert Path(f"{path}.idx").is_file()


def test_given_feature_source_overrides_paths_and_defaults(feature_tsv):
    path, _ = feature_tsv
    source = open_feature_source(path)
    dm = MatchingDataModule(features="/nonexistent.tsv", feature_source=source, val_pairs=make_pairs(3))
    dm.setup("validate")
    assert dm.feature_source is source and len(dm.datasets["val"]) == 3
    assert dm.pin_memory == torch.cuda.is_available()
    with pytest.raises(ValueError, match="no test_pairs were given"):
        dm.test_dataloader()
    with pytest.raises(ValueError, match="needs `features`"):
        MatchingDataModule()


def test_train_loader_shuffles_reproducibly(feature_tsv):
    path, _ = feature_tsv
    dm = MatchingDataModule(features=str(path), train_pairs=make_pairs(30), batch_size=30)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, RandomSampler)
    pl.seed_everything(7, verbose=False)
    first = all_indices(loader)
    pl.seed_everything(7, verbose=False)
    assert all_indices(loader) == first != list(range(30)) and sorted(first) == list(range(30))


class _IndexRecorder(pl.LightningModule):
    """Writes the pair indices each rank sees in test and predict to `out_dir/{stage}_rank{r}.json`."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.seen: list[int] = []

    def _record(self, batch) -> None:
        self.seen += batch["index"].tolist()

    def _dump(self, stage: str) -> None:
        Path(self.out_dir, f"{stage}_rank{self.global_rank}.json").write_text(json.dumps(self.seen))
        self.seen = []

    def test_step(self, batch, batch_idx):
        self._record(batch)

    def on_test_epoch_end(self):
        self._dump("test")

    def predict_step(self, batch, batch_idx):
        self._record(batch)

    def on_predict_epoch_end(self):
        self._dump("predict")


@pytest.mark.slow
def test_lightning_ddp_sees_every_pair_exactly_once(feature_tsv, tmp_path):
    """Two CPU processes (forked: fast) with Lightning's default use_distributed_sampler=True: no pair lost, none
    repeated, each rank a contiguous shard."""
    path, _ = feature_tsv
    pairs_path = write_pairs_json(tmp_path / "pairs.json", make_pairs(9))
    dm = MatchingDataModule(features=str(path), test_pairs=pairs_path, predict_pairs=pairs_path, batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    model = _IndexRecorder(str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked children must not inherit a used OpenMP pool (not fork-safe)
    try:
        trainer.test(model, datamodule=dm, verbose=False)
        trainer.predict(model, datamodule=dm, return_predictions=False)
    finally:
        torch.set_num_threads(threads)
    for stage in ("test", "predict"):
        shards = [json.loads((tmp_path / f"{stage}_rank{r}.json").read_text()) for r in range(2)]
        assert shards == [[0, 1, 2, 3], [4, 5, 6, 7, 8]], stage
