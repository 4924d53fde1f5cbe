"""The retrieval run behind `eval.py --task retrieval`: captions + features -> sharded, resumable image × caption
scoring in Lightning's test loop -> TR/IR metrics, per-query top-10, score matrix.

    python eval.py --task retrieval --ckpt lxr955 --captions dataset_flickr30k.json --split test \\
        --features flickr30k_obj36.tsv [--k 128] [--devices 2] --out runs/f30k_test

How the work is shared (`lxmert_pl.retrieval.plan_blocks`): the grid is cut into blocks (image chunk × caption chunk
for the full grid, image rows for top-k); the blocks still to score are split over the processes by
`UnpaddedDistributedSampler`, so every pair is scored by exactly one process. Each process encodes each image and
caption it needs through the single-modality layers once (`EncodingCache`). With `k`, the first stage runs first:
each process encodes its share of the images (those of its blocks) and captions, the first-stage vectors are
gathered, rank 0 picks the candidates and hands them to every process.

Resume: each finished block is written to `<out>/shards/block_NNNNNN.npz` (written to a temporary name, then renamed:
a killed run leaves only whole files) together with `shards/settings.json` (what was run) and, with `k`,
`shards/first_stage.npz` (the candidates). A rerun with the same settings scores only the missing blocks; other
settings in the same folder are an error. `retrieval.max_blocks=N` stops each process after N blocks (for jobs with
a time limit); the run then reports what remains and a rerun continues.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from lxmert_pl.data.sampler import UnpaddedDistributedSampler
from lxmert_pl.distributed import world_and_rank
from lxmert_pl.errors import UserInputError
from lxmert_pl.export import EvaluationResult, add_evaluation
from lxmert_pl.export.model_card import check_card
from lxmert_pl.features.sources import expand_feature_paths
from lxmert_pl.fileio import atomic_writer, write_atomically
from lxmert_pl.fingerprint import compare, file_sha256, fingerprint
from lxmert_pl.metrics import best_relevant_rank, grid_retrieval_metrics
from lxmert_pl.model.heads import LxmertMatchingModel
from lxmert_pl.model.compile import compile_layers, run_device
from lxmert_pl.model.loading import load_lxmert
from lxmert_pl.pairs.io import CaptionSet, read_captions
from lxmert_pl.registry import resolve_checkpoint
from lxmert_pl.retrieval import (BlockScores, Candidates, EncodingCache, GridBlock, ImageLoader, assemble_scores,
                                 check_k, check_mode, cross_scores, plan_blocks, relevance_matrix, split_directions)
from lxmert_pl.runs.config import REPO_ROOT, _absolute_paths, load_group
from lxmert_pl.runs.console import say
from lxmert_pl.runs.errors import lightning_settings
from lxmert_pl.runs.evaluate import PrefetchImages, build_feature_source, image_cache_path
from lxmert_pl.runs.loggers import build_loggers, wandb_logger
from lxmert_pl.runs.outputs import metrics_table, write_metrics
from lxmert_pl.runs.report import REPORT_NAME, report_enabled, write_retrieval_report
from lxmert_pl.runs.placement import choose_strategy
from lxmert_pl.tokenizer import LxmertTokenizer

TOP_N = 10  # candidates per query in top10.json


class ShardMismatchError(UserInputError):
    """The output folder holds shards of a run with other settings."""


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


class ShardStore:
    """`<out>/shards/`: finished blocks, the first stage's candidates and the settings they belong to."""

    def __init__(self, directory: Path):
        self.dir = directory

    def check_record(self, record: dict[str, Any], overwrite: bool = False) -> None:
        """Record what makes the shards (`lxmert_pl.fingerprint`), or check it against the recorded one: shards made
        otherwise are refused naming what changed, or deleted first with `overwrite`."""
        path = self.dir / "settings.json"
        if path.exists():
            try:
                old = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                old = None
            changed = compare(old, record)
            if not changed:
                return
            if not overwrite:
                raise ShardMismatchError(
                    f"{self.dir} holds the blocks of a retrieval run made otherwise ({'; '.join(changed)}): use "
                    f"another --out, or --overwrite to delete them and start afresh")
            say(f"--overwrite: deleting the blocks in {self.dir}, made otherwise ({'; '.join(changed)})")
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(record, indent=2) + "\n")

    def block_path(self, block: int) -> Path:
        return self.dir / f"block_{block:06d}.npz"

    def done(self, num_blocks: int) -> set[int]:
        """The blocks whose files are present and readable; a damaged one (truncated, edited) is named, deleted and
        scored again."""
        done = set()
        for block in range(num_blocks):
            path = self.block_path(block)
            if not path.exists():
                continue
            try:
                with np.load(path, allow_pickle=False) as data:
                    sizes = {len(data[name]) for name in ("image", "caption", "score")}
                if len(sizes) != 1:
                    raise ValueError(f"arrays of different lengths {sorted(sizes)}")
            except FileNotFoundError:
                continue  # deleted meanwhile by another process that found it damaged
            except Exception as err:  # numpy/zipfile raise many types for a damaged file
                say(f"{path}: damaged ({type(err).__name__}: {err}); deleted, its block is scored again")
                path.unlink(missing_ok=True)
                continue
            done.add(block)
        return done

    def write_block(self, part: BlockScores) -> None:
        _atomic_save_npz(self.block_path(part.block), image=part.image, caption=part.caption, score=part.score)

    def read_block(self, block: GridBlock, candidates: Candidates | None) -> BlockScores:
        path = self.block_path(block.index)
        with np.load(path, allow_pickle=False) as data:
            part = BlockScores(block.index, data["image"], data["caption"], data["score"])
        image, caption = block.pairs(candidates)
        if not (np.array_equal(part.image, image.numpy()) and np.array_equal(part.caption, caption.numpy())):
            raise ShardMismatchError(f"{path} does not hold the pairs of block {block.index} "
                                     f"({len(part.score)} pairs, expected {len(image)}): delete it to rescore it")
        return part

    @property
    def first_stage_path(self) -> Path:
        return self.dir / "first_stage.npz"

    def write_candidates(self, candidates: Candidates) -> None:
        _atomic_save_npz(self.first_stage_path, i2t=candidates.i2t.numpy(), t2i=candidates.t2i.numpy())

    def read_candidates(self) -> Candidates:
        with np.load(self.first_stage_path, allow_pickle=False) as data:
            return Candidates(torch.from_numpy(data["i2t"]), torch.from_numpy(data["t2i"]))


def _identity(item: Any) -> Any:
    return item


class BlockDataModule(pl.LightningDataModule):
    """The test loader over the blocks still to score, sharded over the processes once they exist (the sampler
    reads the world size and rank of the initialised process group, so it is built in `test_dataloader`)."""

    def __init__(self, pending: Sequence[GridBlock], load_images: ImageLoader, num_workers: int = 0):
        super().__init__()
        self.pending = list(pending)
        self.load_images = load_images
        self.num_workers = num_workers

    def test_dataloader(self) -> DataLoader:
        world, _ = world_and_rank()
        # At least one item per process (None = no work): a process without batches would skip the epoch hooks and
        # leave the others waiting in their collectives.
        padding = [None] * max(0, world - len(self.pending), 1 - len(self.pending))
        dataset = BlockDataset(self.pending + padding, self.load_images)
        return DataLoader(dataset, batch_size=None, collate_fn=_identity, num_workers=self.num_workers,
                          sampler=UnpaddedDistributedSampler(dataset) if world > 1 else None)


class BlockDataset(Dataset):
    """Items = the blocks still to score (None: an empty item), each with its images' features and normalised boxes
    (loaded here, so DataLoader workers read ahead).

    Blocks are row-major (an image chunk, then each of its caption chunks): features are loaded when an item's
    images differ from those of the item this dataset (or this worker's copy) loaded last, else the item carries
    None and the module scores it with the images it encoded for that earlier item. Each image chunk is read once
    per process instead of once per caption block.
    """

    def __init__(self, blocks: Sequence[GridBlock | None], load_images: ImageLoader):
        self.blocks = list(blocks)
        self.load_images = load_images
        self._last_images: list[int] | None = None

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, position: int) -> dict[str, Any] | None:
        block = self.blocks[position]
        if block is None:  # padding: every process runs its hooks (and their collectives) even without work
            return None
        images = list(block.images)
        if images == self._last_images:
            return {"block": block.index, "images": images, "features": None, "boxes": None}
        self._last_images = images
        features, boxes = self.load_images(images)
        return {"block": block.index, "images": images, "features": features, "boxes": boxes}


def source_loader(source, img_ids: Sequence[str]) -> ImageLoader:
    """An `ImageLoader` over a feature source: image index -> (features, normalised boxes)."""
    return _SourceLoader(source, list(img_ids))


class _SourceLoader:
    def __init__(self, source, img_ids: list[str]):
        self.source, self.img_ids = source, img_ids

    def __call__(self, index: Sequence[int]):
        records = [self.source.get(self.img_ids[i]) for i in index]
        return [r.features for r in records], [r.normalized_boxes() for r in records]


class RetrievalModule(pl.LightningModule):
    """Scores the blocks the test loop hands it; writes each to the shard store; gathers on rank 0.

    `results` after `trainer.test` (rank 0): {"parts": [BlockScores of this run], "pairs_scored": per-rank counts,
    "captions_encoded"/"images_encoded": per-rank counts, "candidates": Candidates | None}; other ranks: None.
    """

    def __init__(self, model: LxmertMatchingModel, sentences: Sequence[str], num_images: int,
                 plan: Sequence[GridBlock], store: ShardStore, load_images: ImageLoader, *, k: int | None,
                 mode: str = "itm", batch_size: int = 64, max_seq_length: int = 20, max_blocks: int | None = None,
                 candidates: Candidates | None = None):
        super().__init__()
        check_mode(model, mode)
        check_k(k)
        self.model = model
        self.sentences = sentences
        self.num_images = num_images
        self.plan = list(plan)
        self.store = store
        self.load_images = load_images
        self.k = k
        self.mode = mode
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.max_blocks = max_blocks
        self.candidates = candidates
        self.results: dict[str, Any] | None = None
        self._parts: list[BlockScores] = []
        self._cache: EncodingCache | None = None

    def on_test_epoch_start(self) -> None:
        self.model.eval()
        self._parts = []
        self._cache = EncodingCache(self.model, LxmertTokenizer(max_seq_length=self.max_seq_length), self.sentences,
                                    self.batch_size)
        if self.k is not None and self.candidates is None:
            self.candidates = self._first_stage()

    def _first_stage(self) -> Candidates:
        """Each process: the images of its share of all blocks and an even share of the captions; gathered."""
        world, rank = world_and_rank()
        share = UnpaddedDistributedSampler(self.plan, num_replicas=world, rank=rank)
        images = [i for block in self.plan[share.start : share.stop] for i in block.images]
        num_captions = len(self.sentences)
        captions = list(range(rank * num_captions // world, (rank + 1) * num_captions // world))
        features, boxes = self.load_images(images)
        self._cache.add_images(images, features, boxes)
        image_vecs, caption_vecs = self._cache.first_stage_vectors(images, captions)
        local = (images, image_vecs.cpu(), captions, caption_vecs.cpu())
        parts = [local]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, local)
        chosen: list[Any] = [None]
        if rank == 0:
            hidden = self.model.config.hidden_size
            image_all, caption_all = torch.zeros(self.num_images, hidden), torch.zeros(num_captions, hidden)
            for img_idx, img_vec, cap_idx, cap_vec in parts:
                image_all[img_idx] = img_vec
                caption_all[cap_idx] = cap_vec
            chosen[0] = Candidates.from_first_stage(image_all @ caption_all.T, self.k)
            self.store.write_candidates(chosen[0])
        if world > 1:
            dist.broadcast_object_list(chosen, src=0)
        return chosen[0]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch is None or (self.max_blocks is not None and len(self._parts) >= self.max_blocks):
            return
        block = self.plan[batch["block"]]
        features, boxes = batch["features"], batch["boxes"]
        if features is None and not all(self._cache.has_image(i) for i in batch["images"]):
            features, boxes = self.load_images(batch["images"])  # not loaded with an earlier block after all
        if features is not None:
            self._cache.add_images(batch["images"], features, boxes)
        image_index, caption_index = block.pairs(self.candidates)
        scores = cross_scores(self.model, self._cache, image_index, caption_index, self.batch_size, self.mode)
        part = BlockScores(block.index, image_index.numpy(), caption_index.numpy(), scores.numpy())
        self.store.write_block(part)
        self._parts.append(part)

    def on_test_epoch_end(self) -> None:
        world, rank = world_and_rank()
        local = {"parts": self._parts, "pairs_scored": sum(len(p.score) for p in self._parts),
                 "captions_encoded": self._cache.captions_encoded, "images_encoded": self._cache.images_encoded}
        gathered = [local]
        if world > 1:
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(local, gathered, dst=0)
        if rank != 0:
            self.results = None
            return
        self.results = {"parts": [p for g in gathered for p in g["parts"]], "candidates": self.candidates,
                        **{key: [g[key] for g in gathered] for key in ("pairs_scored", "captions_encoded",
                                                                       "images_encoded")}}


def _record(cfg: DictConfig, captions: CaptionSet, weights: Path, k: int | None, source) -> dict[str, Any]:
    """What the shards depend on (`lxmert_pl.fingerprint`): a rerun made otherwise must not reuse them."""
    digest = hashlib.sha1()
    for text in (*captions.img_ids, "\x00", *captions.sentences, "\x00", *map(str, captions.caption_image)):
        digest.update(text.encode("utf-8") + b"\x01")
    r = cfg.retrieval
    settings = {"model_config": cfg.model_config, "mode": cfg.mode, "precision": str(cfg.trainer.precision), "k": k,
                "image_block": int(r.image_block), "caption_block": int(r.caption_block),
                "max_seq_length": int(cfg.data.max_seq_length), "num_images": captions.num_images,
                "num_captions": captions.num_captions, "set_sha1": digest.hexdigest()}
    if hasattr(source, "prefetch"):  # one-step: the images, the detector and its settings make the features
        features = [str(cfg.data.images)]
        extraction = json.loads(source.settings.to_json())
        settings["extraction"] = {key: value for key, value in extraction.items()
                                  if key not in ("format", "version", "detector", "lxmert_pl_version")}
        settings["given_boxes_sha256"] = file_sha256(cfg.data.given_boxes) if cfg.data.given_boxes else None
    else:
        features = [str(p) for p in expand_feature_paths(list(cfg.data.features))]
    return fingerprint(weights, features, settings)


def _preset_note(cfg: DictConfig, source_text: str) -> str:
    """A note when the images or features come from the `--test` preset (eval.yaml's default `demo_val`) rather
    than from the command line: retrieval of the user's captions against the demo's images is no one's intent."""
    if not cfg.get("test"):
        return ""
    split = _absolute_paths(load_group("test", cfg.test), REPO_ROOT)
    if source_text.startswith("features:"):
        used, preset = [str(p) for p in cfg.data.features], [str(p) for p in split.get("features") or []]
    else:
        used, preset = str(cfg.data.images), str(split.get("images"))
    if used != preset:
        return ""
    return (f" [from configs/test/{cfg.test}.yaml (--test {cfg.test}): pass --features or --images for the images of "
            f"{cfg.retrieval.captions}]")


def retrieval_name(cfg: DictConfig) -> str:
    r = cfg.retrieval
    base = f"{Path(str(r.captions)).stem}_{r.split}" if r.split else Path(str(r.captions)).stem
    return str(cfg.name or base + ("" if r.k is None else f"_k{r.k}") + ("" if cfg.mode == "itm" else "_cosine"))


def _check_features(captions: CaptionSet, source, skip_missing: bool, source_text: str) -> CaptionSet:
    missing = [img_id for img_id in captions.img_ids if img_id not in source]
    if not missing:
        return captions
    if not skip_missing:
        raise UserInputError(f"{len(missing)} of {captions.num_images} images of {captions.source} have no features "
                             f"in {source_text} (e.g. {', '.join(missing[:5])}); pass the right --features, or "
                             "data.skip_missing=true to leave them (and their captions) out")
    say(f"Skipping {len(missing)} images without features and their captions (data.skip_missing=true), e.g. "
        f"{', '.join(missing[:3])}")
    return captions.without_images(set(missing))


def build_retrieval_trainer(cfg: DictConfig, loggers: list, callbacks: Sequence[pl.Callback] = ()) -> pl.Trainer:
    with lightning_settings():
        return pl.Trainer(accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
                          num_nodes=cfg.trainer.num_nodes, strategy=choose_strategy(cfg.trainer),
                          precision=cfg.trainer.precision, logger=loggers, use_distributed_sampler=False,
                          enable_checkpointing=False, enable_model_summary=False, inference_mode=True,
                          callbacks=list(callbacks))


def run_retrieval(cfg: DictConfig) -> dict[str, Any]:
    r = cfg.retrieval
    if not r.captions:
        raise UserInputError("no captions: pass --captions FILE (Karpathy split file, LXMERT caption file or pair "
                             "file)")
    if not Path(str(r.captions)).exists():
        raise FileNotFoundError(2, "captions file not found", str(r.captions))
    k = None if r.k is None else int(r.k)
    check_k(k)
    card = check_card(cfg.card) if cfg.get("card") else None  # before the run, not after its results
    captions = read_captions(r.captions, split=r.split or None, caption_source=r.caption_source,
                             skip_blank=bool(r.skip_blank))
    name = retrieval_name(cfg)
    out_dir = Path(cfg.out) if cfg.out else REPO_ROOT / "outputs" / name
    out_dir.mkdir(parents=True, exist_ok=True)

    resolved = resolve_checkpoint(str(cfg.ckpt))
    model, report = load_lxmert(resolved.path, model_config=cfg.model_config,
                                require=("matching",) if cfg.mode == "itm" else ())
    compile_layers(model, bool(cfg.model.compile), run_device(str(cfg.trainer.accelerator)))
    say(f"Weights: {resolved.describe()}\n  {report.summary()}")
    loggers = build_loggers(cfg.logger, out_dir, name, OmegaConf.to_container(cfg, resolve=True))
    # One-step (--images): the processes share the detection in `setup`, each image detected once (PrefetchImages).
    prefetch = PrefetchImages(int(cfg.detector.batch_size), image_cache_path(cfg, out_dir))
    trainer = build_retrieval_trainer(cfg, loggers, [prefetch])
    source, source_text = build_feature_source(cfg, out_dir, writes_cache=trainer.is_global_zero)
    source_text += _preset_note(cfg, source_text)
    say(f"Images: {source_text}")
    captions = _check_features(captions, source, bool(cfg.data.skip_missing), source_text)
    prefetch.wanted = (source, list(captions.img_ids))

    store = ShardStore(out_dir / "shards")
    store.check_record(_record(cfg, captions, resolved.path, k, source), overwrite=bool(cfg.get("overwrite", False)))
    plan = plan_blocks(captions.num_images, captions.num_captions, k, int(r.image_block), int(r.caption_block))
    done = store.done(len(plan))
    candidates = store.read_candidates() if k is not None and store.first_stage_path.exists() else None
    pending = [b for b in plan if b.index not in done]
    load_images = source_loader(source, captions.img_ids)
    module = RetrievalModule(model, captions.sentences, captions.num_images, plan, store, load_images, k=k,
                             mode=cfg.mode, batch_size=int(cfg.data.batch_size),
                             max_seq_length=int(cfg.data.max_seq_length),
                             max_blocks=None if r.max_blocks is None else int(r.max_blocks), candidates=candidates)
    protocol = "full grid" if k is None else f"first stage + top-{k} re-ranking"
    say(f"Retrieval: {captions.num_images} images x {captions.num_captions} captions ({captions.source}), "
        f"{protocol}, {cfg.mode}\nFeatures: {source_text}\nBlocks: {len(plan)} ({len(done)} already in "
        f"{store.dir}), output: {out_dir}")
    if captions.skipped_blank:
        say(f"Skipped {captions.skipped_blank} blank captions (retrieval.skip_blank=true).")
    datamodule = BlockDataModule(pending, load_images, int(cfg.data.num_workers))
    trainer.test(module, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return {"out_dir": out_dir, "metrics": {}}
    results = module.results
    candidates = results["candidates"]
    new = {p.block: p for p in results["parts"]}
    parts = list(new.values()) + [store.read_block(plan[b], candidates) for b in sorted(done)]
    run_info = {"pairs_scored_this_run": int(sum(results["pairs_scored"])),
                "pairs_scored_per_process": results["pairs_scored"],
                "captions_encoded_per_process": results["captions_encoded"],
                "images_encoded_per_process": results["images_encoded"]}
    remaining = len(plan) - len(parts)
    if remaining:
        say(f"Stopped with {remaining} of {len(plan)} blocks left (retrieval.max_blocks={r.max_blocks}); rerun the "
            f"same command to continue from {store.dir}.")
        return {"out_dir": out_dir, "metrics": {}, "complete": False, **run_info}
    scores = assemble_scores(parts, captions.num_images, captions.num_captions)
    expected = captions.num_images * captions.num_captions if candidates is None else int(candidates.pairs.sum())
    scored = sum(len(p.score) for p in parts)
    if scored != expected:
        raise RuntimeError(f"{scored} pairs scored, expected {expected}")
    i2t, t2i = split_directions(scores, candidates)
    relevant = relevance_matrix(captions.caption_image, captions.num_images)
    metrics = grid_retrieval_metrics(i2t, relevant, t2i)
    protocol_info = {"protocol": "full_grid" if k is None else "topk_rerank", "k": k, "split": r.split,
                     "captions": str(r.captions), "caption_set": captions.source, "num_images": captions.num_images,
                     "num_captions": captions.num_captions, "pairs_scored": scored, "mode": cfg.mode,
                     "precision": str(cfg.trainer.precision), "skipped_blank_captions": captions.skipped_blank,
                     "first_stage": None if k is None else "cosine([CLS] after language layers, mean vision state "
                                                           "after object-relationship layers)"}
    finite = {key: (value if math.isfinite(value) else None) for key, value in metrics.items()}
    write_metrics(out_dir, finite, {"ckpt": str(cfg.ckpt), "weights": str(resolved.path), **protocol_info,
                                    **run_info})
    rows = write_top_queries(out_dir, captions, i2t, t2i, relevant)
    if report_enabled(cfg):
        write_retrieval_report(out_dir, cfg, rows=rows, metrics=finite, img_ids=captions.img_ids, resolved=resolved,
                               source=source, name=name)
    if captions.num_images * captions.num_captions <= int(r.save_scores_max):
        with atomic_writer(out_dir / "scores.npy", "wb") as handle:
            np.save(handle, scores.numpy())
        if candidates is not None:
            _atomic_save_npz(out_dir / "candidates.npz", i2t=candidates.i2t.numpy(), t2i=candidates.t2i.numpy())
    write_atomically(out_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    for logger in loggers:
        logger.log_metrics({f"test/{key}": v for key, v in metrics.items() if math.isfinite(v)})
        logger.save()
    _log_wandb(loggers, metrics, rows, int(r.worst_queries))
    if card is not None:
        protocol_text = f"retrieval, {protocol_info['protocol']}, {cfg.mode}, weights {resolved.describe()}"
        result = EvaluationResult(name, str(r.captions), protocol_text, finite, shlex.join(["eval.py", *sys.argv[1:]]))
        say(f"Model card: {add_evaluation(card, result)} (Evaluation: {name})")
    say(f"Retrieval metrics (fractions; RSUM = sum of the six R@K, max 6):\n{metrics_table(metrics)}")
    say(f"Metrics: {out_dir / 'metrics.json'}\nTop-{TOP_N} per query: {out_dir / 'top10.json'}"
        + (f"\nReport: {out_dir / REPORT_NAME}" if report_enabled(cfg) else ""))
    return {"out_dir": out_dir, "metrics": metrics, "scores": scores, "complete": True, **run_info}


def write_top_queries(out_dir: Path, captions: CaptionSet, i2t: torch.Tensor, t2i: torch.Tensor,
                      relevant: torch.Tensor) -> list[dict]:
    """top10.json: per query (image -> captions, caption -> images) its relevant items, the 1-based rank of the best
    one (null: never retrieved), and the top-10 candidates with scores. Returns the rows, worst rank first."""
    rows: list[dict] = []
    for direction, scores, rel, names, others in (("i2t", i2t, relevant, captions.img_ids, captions.sentences),
                                                  ("t2i", t2i.T, relevant.T, captions.sentences, captions.img_ids)):
        queries = rel.any(dim=1).nonzero().flatten()
        ranks = best_relevant_rank(scores[queries].float(), rel[queries])
        top_n = min(TOP_N, scores.shape[1])
        top_scores, top_index = scores[queries].topk(top_n, dim=1)
        for row, q in enumerate(queries.tolist()):
            rank = float(ranks[row])
            rows.append({"direction": direction, "query": q, "query_text": names[q],
                         "relevant": rel[q].nonzero().flatten().tolist(),
                         "rank": int(rank) + 1 if math.isfinite(rank) else None,
                         "top": [{"index": int(j), "text": others[j], "score": float(s) if math.isfinite(s) else None}
                                 for j, s in zip(top_index[row].tolist(), top_scores[row].tolist())]})
    tmp = out_dir / "top10.json.tmp"
    tmp.write_text(json.dumps(rows, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "top10.json")
    return sorted(rows, key=lambda row: -(row["rank"] or math.inf))


def _log_wandb(loggers: list, metrics: dict, rows: list[dict], limit: int) -> None:
    logger = wandb_logger(loggers)
    if logger is None:
        return
    import wandb

    run = logger.experiment
    clean = {f"test/{key}": v for key, v in metrics.items() if math.isfinite(v)}
    run.summary.update(clean)
    run.log(clean)
    columns = ["direction", "query", "rank", "relevant", "top1", "top1_score"]
    data = [[row["direction"], row["query_text"], row["rank"], str(row["relevant"][:5]), row["top"][0]["text"],
             row["top"][0]["score"]] for row in rows[:limit]]
    run.log({"worst_queries": wandb.Table(columns=columns, data=data)})
    logger.finalize("success")
    run.finish()
