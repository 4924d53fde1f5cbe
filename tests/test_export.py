"""Export to the transformers layout (`python -m lxmert_pl.export`) and model cards (train.py, eval.py --card).

transformers' `LxmertForPreTraining.from_pretrained` must load the exported folder with no missing encoder or
matching-head tensors, and give our matching logits within 1e-5; `AutoTokenizer.from_pretrained` must give our ids.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from e2e_helpers import run_in_process, write_shape_task

from lxmert_pl.export import EvaluationResult, add_evaluation, read_model_card
from lxmert_pl.export.__main__ import main as export_main
from lxmert_pl.model import LxmertMatchingModel, get_preset, load_lxmert
from lxmert_pl.tokenizer import LxmertTokenizer

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


def load_transformers(directory):
    """`LxmertForPreTraining.from_pretrained(directory)` and the keys it reported missing / unexpected."""
    model, info = transformers.LxmertForPreTraining.from_pretrained(str(directory), output_loading_info=True)
    return model.eval(), set(info["missing_keys"]), set(info["unexpected_keys"])


def matching_logits_both(ours: LxmertMatchingModel, theirs, ids, mask, feats, boxes) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask, visual_feats=feats, visual_pos=boxes,
                     token_type_ids=torch.zeros_like(ids)).cross_relationship_score
        return ours(ids, mask, feats, boxes).match_logits, ref


@pytest.mark.parametrize("weights", ["tiny_LXRT.pth", "tiny_LXRT_strong.pth"])
def test_original_snapshot_exports_for_transformers(lxrt_golden, tmp_path, weights):
    out = tmp_path / "hf"
    config = lxrt_golden / "tiny_config.json"
    assert export_main(["--ckpt", str(lxrt_golden / weights), "--model-config", str(config), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "special_tokens_map.json", "tokenizer_config.json", "vocab.txt"]
    theirs, missing, unexpected = load_transformers(out)
    assert not missing and not unexpected  # every head of the pretraining snapshot travels

    io = np.load(lxrt_golden / ("tiny_io_strong.npz" if "strong" in weights else "tiny_io.npz"))
    ids, mask = torch.from_numpy(io["input_ids"]), torch.from_numpy(io["input_mask"])
    ours, _ = load_lxmert(lxrt_golden / weights, model_config=config)
    got, ref = matching_logits_both(ours, theirs, ids, mask, torch.from_numpy(io["feats"]),
                                    torch.from_numpy(io["boxes"]))
    assert float((got - ref).abs().max()) <= ATOL
    assert float(np.abs(ref.numpy() - io["cross_relationship_score"]).max()) <= ATOL  # the original code's

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    encoded = tokenizer([str(s) for s in io["sentences"]], padding="max_length", truncation=True,
                        return_tensors="pt")
    assert torch.equal(encoded["input_ids"], ids) and torch.equal(encoded["attention_mask"], mask)

    card, evaluations = read_model_card(out)
    text = (out / "README.md").read_text()
    assert card.source_sha256 and card.source_sha256 in text and str(lxrt_golden / weights) in text
    assert "index 1 = matched" in text and "max sequence length 20" in text and "36 per image" in text
    assert "python -m lxmert_pl.export --ckpt" in text and evaluations == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A train.py run (in this process) on a tiny learnable task with validation: best.ckpt and the card beside it."""
    tmp = tmp_path_factory.mktemp("train_export")
    data = write_shape_task(tmp, 24, seed=0, prefix="small", dim=64)
    torch.manual_seed(0)
    model = LxmertMatchingModel(get_preset("tiny").replace(visual_feat_dim=64))
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp / "init.pth")
    (tmp / "init.pth.config.json").write_text(json.dumps(model.config.to_dict()))
    proc = run_in_process("train.py", "--ckpt", tmp / "init.pth", "--train", data["pairs"], "--val", data["pairs"],
                          "--features", data["tsv"], "--batch-size", "16", "--max-epochs", "2", "--out", tmp / "run",
                          "trainer.accelerator=cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**data, "tmp": tmp, "best": tmp / "run" / "checkpoints" / "best.ckpt", "stdout": proc.stdout}


def test_train_writes_a_model_card_next_to_best(trained):
    card, _ = read_model_card(trained["best"].parent)
    assert card is not None and f"Model card: {trained['best'].parent / 'README.md'}" in trained["stdout"]
    assert card.training.train_pairs == str(trained["pairs"]) and card.training.epochs == 2
    assert card.training.base_checkpoint == str(trained["tmp"] / "init.pth")
    assert "roc_auc" in card.training.metrics and card.heads == ["matching"]
    text = (trained["best"].parent / "README.md").read_text()
    assert "Fine-tuned with lxmert_pl's `train.py`" in text and "| roc_auc |" in text
    assert text.split("<!-- lxmert_pl:card-data")[0].count("train.py --ckpt") == 1  # the command that made it


def test_train_checkpoint_exports_for_transformers(trained, tmp_path):
    out = tmp_path / "hf"
    assert export_main(["--ckpt", str(trained["best"]), "--out", str(out), "--boxes", "10-100"]) == 0
    theirs, missing, unexpected = load_transformers(out)
    # Only the LM head, which train.py drops and transformers always builds, is missing.
    assert not unexpected and missing and all(k.startswith("cls.predictions.") for k in missing)

    ours, _ = load_lxmert(trained["best"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (4, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    feats, xy = torch.rand(4, 7, 64, generator=g), torch.rand(4, 7, 2, generator=g) * 0.5
    got, ref = matching_logits_both(ours, theirs, ids, mask, feats, torch.cat([xy, xy + 0.3], -1))
    assert float((got - ref).abs().max()) <= ATOL

    card, _ = read_model_card(out)
    assert card.training is not None and card.training.train_pairs == str(trained["pairs"])  # carried over
    assert card.features.boxes == "10-100" and json.loads((out / "config.json").read_text())["task_qa"] is False
    assert "lm head(s) anyway: random there" in (out / "README.md").read_text()


def test_eval_adds_its_metrics_to_the_card(trained, tmp_path):
    card_dir = trained["best"].parent
    proc = run_in_process("eval.py", "--ckpt", trained["best"], "--pairs", trained["pairs"], "--features",
                          trained["tsv"], "--out", tmp_path / "eval", "--name", "shapes_val", "--card", card_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, evaluations = read_model_card(card_dir)
    assert [e.name for e in evaluations] == ["shapes_val"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluations[0].metrics["roc_auc"] == pytest.approx(metrics["metrics"]["roc_auc"]
                                                              if "metrics" in metrics else metrics["roc_auc"])
    assert "itm scoring, threshold 0.5" in evaluations[0].protocol and evaluations[0].command.startswith("eval.py")


def test_add_evaluation_updates_in_place_and_keeps_a_foreign_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Someone's model\n\nTheir text.\n")
    add_evaluation(tmp_path, EvaluationResult("val", "val.json", "itm", {"roc_auc": 0.5}))
    add_evaluation(readme, EvaluationResult("test", "test.json", "itm", {"roc_auc": 0.7}))
    add_evaluation(readme, EvaluationResult("val", "val.json", "itm", {"roc_auc": 0.9}))
    text = readme.read_text()
    assert text.startswith("# Someone's model\n\nTheir text.\n") and text.count("## Evaluation") == 1
    _, evaluations = read_model_card(readme)
    assert [(e.name, e.metrics["roc_auc"]) for e in evaluations] == [("test", 0.7), ("val", 0.9)]
    assert "| roc_auc | 0.9000 |" in text and "0.5000" not in text


def test_tokenizer_files_give_our_ids(tmp_path):
    from lxmert_pl.export import write_tokenizer_files

    write_tokenizer_files(tmp_path, max_seq_length=12)
    sentences = ["Café owners' DOGS, sitting!", "a [MASK] word", "x " * 30, "Über-long unaffable words"]
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))(sentences, padding="max_length",
                                                                       truncation=True, return_tensors="pt")
    ours = LxmertTokenizer(max_seq_length=12)(sentences)
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    assert torch.equal(theirs["attention_mask"], ours["attention_mask"])
