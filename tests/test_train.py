"""train.py: exact resume, DDP on 2 CPU processes, checkpoints usable by eval.py, caption negatives, freezing.

The DDP run is a train.py process of its own (Lightning launches the second one); the other runs call the entry
points' `main` in this process (`run_in_process`: the same run without ~6 s of start-up each)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from omegaconf import OmegaConf
from e2e_helpers import run_in_process, run_script, write_shape_task

from lxmert_pl.data.dataset import MatchingDataset
from lxmert_pl.data.train_datamodule import CaptionNegativesDataset, normalise_caption
from lxmert_pl.runs.module import MatchingModule, TrainingSettings
from lxmert_pl.model import LxmertMatchingModel, get_preset
from lxmert_pl.pairs.io import Pair
from lxmert_pl.tokenizer import LxmertTokenizer


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    data = write_shape_task(tmp, 40, seed=0, prefix="small", dim=64)
    torch.manual_seed(0)
    model = LxmertMatchingModel(get_preset("tiny").replace(visual_feat_dim=64))
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp / "init.pth")
    (tmp / "init.pth.config.json").write_text(json.dumps(model.config.to_dict()))
    return {**data, "ckpt": tmp / "init.pth", "tmp": tmp}


def _train_args(task, out, *extra, max_epochs: int = 3) -> list:
    return ["--ckpt", task["ckpt"], "--train", task["pairs"], "--features", task["tsv"], "--batch-size", "8",
            "--max-epochs", str(max_epochs), "--out", out, "trainer.log_every_n_steps=1", "trainer.accelerator=cpu",
            *extra]


def _train(task, out, *extra, max_epochs: int = 3):
    """train.py as a process of its own."""
    proc = run_script("train.py", *_train_args(task, out, *extra, max_epochs=max_epochs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture
def train_here(task):
    """`_train` in this process: train_here(out, *extra, max_epochs=3)."""
    def train(out, *extra, max_epochs: int = 3):
        proc = run_in_process("train.py", *_train_args(task, out, *extra, max_epochs=max_epochs))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return train


def _losses(out):
    with open(out / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_resume_mid_epoch_continues_exactly(tmp_path, train_here):
    # 80 pairs / 8 = 10 batches per epoch: stop at step 7 (mid-epoch), resume to 13, compare with one run to 13.
    # The runs share this process: the whole run goes between the stop and the resume, so that nothing the resume
    # needs can come from the memory of the run it resumes (only from last.ckpt).
    train_here(tmp_path / "a", "trainer.max_steps=7")
    train_here(tmp_path / "c", "trainer.max_steps=13")
    train_here(tmp_path / "b", "trainer.max_steps=13", "--resume", tmp_path / "a" / "checkpoints" / "last.ckpt")
    resumed, whole = _losses(tmp_path / "b"), _losses(tmp_path / "c")
    assert sorted(resumed) == list(range(7, 13))
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(whole[step], abs=1e-6), step
    assert _losses(tmp_path / "a") == {s: whole[s] for s in range(7)}


def test_feature_globs_are_expanded_and_recorded_as_files(task, tmp_path):
    """`--features` takes globs (as eval.py does): the run records the matched files, so a resume with the same
    pattern passes the data check."""
    pattern = str(task["tsv"].parent / ("*" + task["tsv"].suffix))
    proc = run_in_process("train.py", "--ckpt", task["ckpt"], "--train", task["pairs"], "--features", pattern,
                          "--batch-size", "8", "--out", tmp_path / "g", "trainer.max_steps=2",
                          "trainer.accelerator=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert OmegaConf.load(tmp_path / "g" / "config.yaml").data.features == [str(task["tsv"])]
    proc = run_in_process("train.py", "--ckpt", task["ckpt"], "--train", task["pairs"], "--features", pattern,
                          "--batch-size", "8", "--out", tmp_path / "g", "trainer.max_steps=3",
                          "trainer.accelerator=cpu", "--resume", tmp_path / "g" / "checkpoints" / "last.ckpt")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_training_and_its_checkpoint_evaluates(task, tmp_path):
    _train(task, tmp_path / "ddp", "--devices", "2", "--val", task["pairs"], max_epochs=1)
    best = tmp_path / "ddp" / "checkpoints" / "best.ckpt"
    assert best.exists() and (tmp_path / "ddp" / "checkpoints" / "last.ckpt").exists()
    proc = run_in_process("eval.py", "--ckpt", best, "--pairs", task["pairs"], "--features", task["tsv"],
                          "--out", tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[lightning]" in proc.stdout
    assert len(json.loads((tmp_path / "eval" / "predictions.json").read_text())) == 80


def test_caption_negatives(task):
    from lxmert_pl.features.sources import open_feature_source

    source = open_feature_source([str(task["tsv"])])
    img_ids = source.img_ids[:10]
    texts = ["a red circle", "a blue star", "the cat", "two dogs", "a green square", "one bus", "a tree"]
    captions = [Pair(i, i, img_ids[i % 10], texts[i % 7], 1, {}) for i in range(30)]  # 3 of 7 captions per image
    base = MatchingDataset(captions, source, LxmertTokenizer())
    data = CaptionNegativesDataset(base, negative_ratio=0.5, seed=3)
    items = [data[i] for i in range(len(data))]
    negatives = [it for it in items if it["label"] == 0]
    assert 5 <= len(negatives) <= 25
    own = {img: {normalise_caption(p.sent) for p in captions if p.img_id == img} for img in img_ids}
    assert all(normalise_caption(it["sent"]) not in own[it["img_id"]] for it in negatives)
    assert [it["sent"] for it in items] == [data[i]["sent"] for i in range(len(data))]  # deterministic
    data.set_epoch(1)
    assert [data[i]["label"] for i in range(30)] != [it["label"] for it in items]  # a new draw each epoch


def test_finetune_modes_freeze_the_encoder():
    model = LxmertMatchingModel(get_preset("tiny"))
    module = MatchingModule(model.config.to_dict(), heads=model.heads, model=model,
                            training_settings=TrainingSettings(finetune="head"))
    module.apply_finetune_mode()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {"cls.seq_relationship.weight", "cls.seq_relationship.bias", "bert.pooler.dense.weight",
                         "bert.pooler.dense.bias"}
    module = MatchingModule(model.config.to_dict(), heads=model.heads, model=model,
                            training_settings=TrainingSettings(finetune="top-k", top_k_cross=1))
    module.apply_finetune_mode()
    assert any(n.startswith("bert.encoder.x_layers.0.") for n, p in module.model.named_parameters() if p.requires_grad)
    assert not any(n.startswith("bert.encoder.layer.") for n, p in module.model.named_parameters() if p.requires_grad)


def _val_roc(model, task):
    from lxmert_pl.features.sources import open_feature_source
    from lxmert_pl.metrics import classification_metrics
    from lxmert_pl.scoring import Scorer

    source = open_feature_source([str(task["val_tsv"])])
    rows = json.loads(task["val_pairs"].read_text())
    feats = [source.get(r["img_id"]) for r in rows]
    result = Scorer(model).score([r["sent"] for r in rows], [f.features for f in feats],
                                 [f.normalized_boxes() for f in feats])
    labels = torch.tensor([r["ground"] == "True" for r in rows], dtype=torch.long)
    return classification_metrics(torch.from_numpy(result.match_prob), labels, 0.5)["roc_auc"]


def test_matching_is_learned_from_scratch(tmp_path):
    """A task matching is learnable on (features encode each object's colour and shape; captions name one object or
    a colour and shape the image lacks): a tiny model trained by train.py goes from ROC-AUC ~0.5 to >= 0.9.
    It fails if the loss treats index 0 as "matched" (the ROC-AUC then falls far below 0.5)."""
    from lxmert_pl.model import load_lxmert

    train = write_shape_task(tmp_path, 300, seed=0, prefix="train", dim=64, max_objects=1)
    val = write_shape_task(tmp_path, 60, seed=1, prefix="val", dim=64, max_objects=1)
    task = {"val_tsv": val["tsv"], "val_pairs": val["pairs"]}
    torch.manual_seed(0)
    config = get_preset("tiny").replace(visual_feat_dim=64, x_layers=2, num_attention_heads=4,
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # tiny, from scratch
    model = LxmertMatchingModel(config, heads=("matching",))
    model.init_weights("fan_in")  # width-appropriate init: see LxmertMatchingModel.init_weights
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "init.pth")
    (tmp_path / "init.pth.config.json").write_text(json.dumps(config.to_dict()))
    before = _val_roc(model.eval(), task)
    assert 0.3 < before < 0.7, before

    proc = run_in_process("train.py", "--ckpt", tmp_path / "init.pth", "--train", train["pairs"], "--val",
                          val["pairs"], "--features", train["tsv"], "--features", val["tsv"], "--out", tmp_path / "run",
                          "--max-epochs", "6", "optim.lr=3e-3", "trainer.accelerator=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained, report = load_lxmert(tmp_path / "run" / "checkpoints" / "best.ckpt")
    assert report.format == "lightning"
    after = _val_roc(trained, task)
    assert after >= 0.9, f"val ROC-AUC {before:.3f} -> {after:.3f}"
