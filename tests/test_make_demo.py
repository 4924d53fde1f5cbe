"""scripts/make_demo.py, the demo's reproduction script, runs every stage but the final eval on a tiny sample (one
short epoch each), and what it writes is what the bundle holds: a detector directory, obj36 TSVs and a weights-only
float16 Lightning checkpoint that loads into an fp32 model. The script's extract.py / train.py commands run through
the entry points' `main` in this process (the same commands, without ~6 s of start-up each)."""

from __future__ import annotations

from pathlib import Path

import sys

import pytest
import torch
from e2e_helpers import call_main

import conftest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    return conftest.load_script(SCRIPTS / f"{name}.py")


@pytest.fixture()
def make_demo(tmp_path, monkeypatch):
    """The script with its folders (sample, demo weights, features, work) moved under tmp_path."""
    sample = tmp_path / "sample"
    assert load_script("make_sample_data").main(["--out", str(sample), "--train", "12", "--val", "4", "--test", "2"]) == 0
    module = load_script("make_demo")
    monkeypatch.setattr(module, "SAMPLE", sample)
    monkeypatch.setattr(module, "DEMO", tmp_path / "demo")
    monkeypatch.setattr(module, "FEATURES", sample / "features")
    monkeypatch.setattr(module, "WORK", tmp_path / "work")

    def run_in_this_process(cmd) -> None:
        """The script's `run` (`python SCRIPT ARGS...` in a subprocess, check=True), in this process."""
        module.log("$ " + " ".join(str(c) for c in cmd))
        python, script, *args = map(str, cmd)
        assert python == sys.executable and call_main(script, *args) == 0, cmd

    monkeypatch.setattr(module, "run", run_in_this_process)
    return module


@pytest.mark.slow
def test_every_stage_but_eval_runs_on_a_tiny_sample(make_demo, tmp_path, capsys, one_torch_thread):
    from lxmert_pl.features.tsv import read_img_ids
    from lxmert_pl.model import load_lxmert

    stages = "detector,labels,probe,features,lxrt,train,convert"
    assert make_demo.main(["--stages", stages, "--det-epochs", "1", "--epochs", "1", "--dim", "32"]) == 0
    out = capsys.readouterr().out
    for stage in stages.split(","):
        assert f"stage {stage}:" in out
    assert "linear probe colour+shape" in out and "detector labels on the val crops" in out
    from lxmert_pl.features.tsv import iter_tsv_features
    from lxmert_pl.vocab import load_vocabulary

    vocabulary = load_vocabulary(tmp_path / "demo" / "frcnn", download=False)
    assert vocabulary.objects == list(make_demo.SHAPES) and vocabulary.attributes == list(make_demo.COLORS)
    row = next(iter_tsv_features(tmp_path / "sample" / "features" / "val_obj.tsv"))
    assert set(row.objects_id.tolist()) <= set(range(5)) and set(row.attrs_id.tolist()) <= set(range(7))

    assert {p.name for p in (tmp_path / "demo" / "frcnn").iterdir()} == {"config.yaml", "model.safetensors"}
    for split, count in (("train", 12), ("val", 4), ("test", 2)):
        assert len(read_img_ids(tmp_path / "sample" / "features" / f"{split}_obj.tsv")) == count

    ckpt_path = tmp_path / "demo" / "lxrt_demo.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"state_dict", "hyper_parameters"}  # weights only: no optimizer state
    assert {t.dtype for t in ckpt["state_dict"].values()} == {torch.float16}
    model, report = load_lxmert(ckpt_path)
    assert report.format == "lightning" and model.has_matching_head
    assert model.config.visual_feat_dim == 32 and model.config.hidden_dropout_prob == 0.0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    stored = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in stored.items() if k in loaded)


def test_unknown_stage_is_refused(make_demo):
    with pytest.raises(SystemExit):
        make_demo.main(["--stages", "detector,trian"])
