"""train.py --resume after a real crash continues exactly; changed settings are honoured or refused; training's
user errors are one line and exit status 2.

Crashes are real: `tests/crashing_train.py` runs train.py and SIGKILLs itself (or raises, or sends itself SIGINT) at
a chosen step; the same train.py command with `--resume last.ckpt` must then end with the weights and per-step
losses of an uninterrupted run. The killed runs are processes of their own; the run ended by an exception, the
uninterrupted references, the resumes and the message tests call `train.main` in this process (the same run without
~6 s of start-up each).
"""

from __future__ import annotations

import csv
import gc
import json
import signal
import subprocess
import sys

import pytest
import torch
from e2e_helpers import REPO_ROOT, call_main, run_in_process, write_pairs, write_shape_task

from lxmert_pl.model import LxmertMatchingModel, get_preset

sys.path.insert(0, str(REPO_ROOT))
import train  # noqa: E402  (the repository's train.py)

STEPS_PER_EPOCH = 4  # 16 images x 2 pairs / batch size 8


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    data = write_shape_task(tmp, 16, seed=0, prefix="small", dim=64)
    torch.manual_seed(0)
    model = LxmertMatchingModel(get_preset("tiny").replace(visual_feat_dim=64))
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp / "init.pth")
    (tmp / "init.pth.config.json").write_text(json.dumps(model.config.to_dict()))
    return {**data, "ckpt": tmp / "init.pth", "tmp": tmp, "references": {}}


def _args(task, out, *extra) -> list[str]:
    return [str(a) for a in ("--ckpt", task["ckpt"], "--train", task["pairs"], "--features", task["tsv"],
                             "--batch-size", "8", "--max-epochs", "3", "--out", out, "trainer.log_every_n_steps=1",
                             "trainer.accelerator=cpu", *extra)]


def _run(*args, crash: tuple[str, str] | None = None) -> subprocess.CompletedProcess:
    script = [str(REPO_ROOT / "tests" / "crashing_train.py"), *crash, "--"] if crash else [str(REPO_ROOT / "train.py")]
    return subprocess.run([sys.executable, *script, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)


def _loss_rows(out) -> list[tuple[int, float]]:
    with open(out / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]


def _losses(out) -> dict[int, float]:
    return dict(_loss_rows(out))


def _last(out) -> dict:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def _reference(task, *settings) -> tuple[dict, dict[int, float]]:
    """An uninterrupted run with these trajectory settings (in this process): (last.ckpt, per-step losses), computed
    once."""
    if settings not in task["references"]:
        out = task["tmp"] / f"whole{len(task['references'])}"
        proc = run_in_process("train.py", *_args(task, out, *settings))
        assert proc.returncode == 0, proc.stderr[-3000:]
        task["references"][settings] = (_last(out), _losses(out))
    return task["references"][settings]


@pytest.mark.slow
@pytest.mark.parametrize("crash, settings, extra, resume_step", [
    # SIGKILL right after epoch 0's last.ckpt: the resumed run must train epochs 1 and 2 (it trained 0 batches of
    # epoch 1 and stopped at step 8 of 12 when the batches to skip came from global-step arithmetic).
    (("epoch:0", "kill"), (), (), 4),
    # SIGKILL mid-epoch, right after the step-6 last.ckpt (epoch 1, batch 2 of 4).
    (("step:6", "kill"), (), ("trainer.checkpoint_every_n_steps=3",), 6),
    # An exception mid-accumulation (accumulate 3: batch 6 has not stepped yet): last.ckpt must be the one of the
    # last optimizer step (step 2), not one written with the accumulated gradients missing.
    (("batch:6", "raise"), ("optim.accumulate=3",), ("trainer.checkpoint_every_n_steps=1",), 2),
])
def test_resume_after_a_crash_matches_an_uninterrupted_run(task, tmp_path, monkeypatch, crash, settings, extra,
                                                           resume_step):
    whole_ckpt, whole_losses = _reference(task, *settings)
    args = _args(task, tmp_path / "run", *settings, *extra)
    if crash[1] == "kill":  # a real SIGKILL: a process of its own
        crashed = _run(*args, crash=crash)
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    else:  # an exception ends the run: in this process it reaches the test (a process would exit 1 with it)
        from crashing_train import CrashAt
        from lxmert_pl.runs import training

        run_train = training.run_train
        monkeypatch.setattr(training, "run_train", lambda cfg: run_train(cfg, callbacks=[CrashAt(*crash)]))
        with pytest.raises(RuntimeError, match="crash injected at batch 6"):
            call_main("train.py", *args)
        monkeypatch.undo()
        gc.collect()  # the crashed run's progress bar, left open as in a crashed process, closes in this test's output
    assert _last(tmp_path / "run")["global_step"] == resume_step
    logged_before = {step: loss for step, loss in _loss_rows(tmp_path / "run") if step < resume_step}
    resumed = run_in_process("train.py", *args, "--resume", tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "best.ckpt" not in resumed.stdout  # no --val: no best.ckpt, and none announced

    final = _last(tmp_path / "run")
    assert final["global_step"] == whole_ckpt["global_step"]
    for key, value in whole_ckpt["state_dict"].items():
        assert torch.allclose(final["state_dict"][key], value, rtol=0, atol=1e-6), key
    rows = _loss_rows(tmp_path / "run")
    losses = dict(rows)
    assert len(rows) == len(losses), "a step logged twice"
    assert logged_before.items() <= losses.items()  # the interrupted run's rows are kept, not deleted by the resume
    assert set(range(resume_step, whole_ckpt["global_step"])) <= set(losses)
    for step, loss in losses.items():
        assert loss == pytest.approx(whole_losses[step], abs=1e-6), step


# ------------------------------------------------------------------------------------------ changed settings
@pytest.fixture(scope="module")
def one_epoch(task, tmp_path_factory):
    """A finished one-epoch run with validation: checkpoints/last.ckpt (step 4) and best.ckpt."""
    out = tmp_path_factory.mktemp("one_epoch")
    assert train.main(_args(task, out, "--val", task["pairs"], "--max-epochs", "1")) == 0
    return out


def _fails(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    last_line = err.strip().splitlines()[-1]  # before it: at most the progress bar of a run that trained
    assert "Traceback" not in err and last_line.startswith("train.py: error: "), err
    return last_line


@pytest.mark.parametrize("change, named", [
    (("--batch-size", "4"), "data.batch_size=8 in the checkpoint, 4 now"),
    (("optim.lr=1e-3",), "optim.lr=5e-05 in the checkpoint, 0.001 now"),
    (("optim.accumulate=2",), "optim.accumulate=1 in the checkpoint, 2 now"),
    (("seed=1",), "seed=0 in the checkpoint, 1 now"),
    (("--num-nodes", "2"), "trainer.num_nodes=1 in the checkpoint, 2 now"),  # processes shard the batches
])
def test_resume_refuses_a_changed_setting(task, one_epoch, tmp_path, capsys, change, named):
    err = _fails(capsys, _args(task, tmp_path, "--val", task["pairs"], "--max-epochs", "2", *change,
                               "--resume", one_epoch / "checkpoints" / "last.ckpt"))
    assert named in err and "--ckpt" in err


def test_a_record_from_before_num_nodes_was_recorded_resumes_on_one_node(task, one_epoch):
    from lxmert_pl.runs.checkpointing import check_resume, read_resume_point

    point = read_resume_point(one_epoch / "checkpoints" / "last.ckpt")
    now = {**point.record, "max_epochs": point.record["max_epochs"] + 1}
    settings = {k: v for k, v in point.record["settings"].items() if k != "trainer.num_nodes"}
    older = {**point.record, "settings": settings}
    assert check_resume(type(point)(point.path, point.epochs_done, point.global_step, older), now)  # a note, no error
    two_nodes = {**now, "settings": {**now["settings"], "trainer.num_nodes": 2}}
    with pytest.raises(Exception, match="trainer.num_nodes=1 in the checkpoint, 2 now"):
        check_resume(type(point)(point.path, point.epochs_done, point.global_step, older), two_nodes)


def test_resume_refuses_changed_training_data(task, one_epoch, tmp_path, capsys):
    fewer = tmp_path / "pairs.json"
    fewer.write_text(json.dumps(json.loads(task["pairs"].read_text())[:-2]))
    argv = _args(task, tmp_path, "--val", task["pairs"], "--max-epochs", "2", "--resume",
                 one_epoch / "checkpoints" / "last.ckpt")
    argv[argv.index("--train") + 1] = str(fewer)
    assert "data.train=sha256 " in _fails(capsys, argv)


def test_resume_refuses_other_features_of_the_same_name_and_size(task, one_epoch, tmp_path, capsys):
    """last.ckpt records the feature files by fingerprint (lxmert_pl.fingerprint): a file of the same name and size
    with other values (here: the rows' feature bytes changed in place) is refused, naming what changed."""
    other = tmp_path / task["tsv"].name
    lines = task["tsv"].read_bytes().split(b"\n")
    fields = lines[0].split(b"\t")
    fields[-1] = fields[-1][4:8] + fields[-1][:4] + fields[-1][8:]  # other feature values, same length
    other.write_bytes(b"\n".join([b"\t".join(fields), *lines[1:]]))
    assert other.stat().st_size == task["tsv"].stat().st_size
    argv = _args(task, tmp_path, "--val", task["pairs"], "--max-epochs", "2", "--resume",
                 one_epoch / "checkpoints" / "last.ckpt")
    argv[argv.index("--features") + 1] = str(other)
    err = _fails(capsys, argv)
    assert "data.features[0].mtime_ns: " in err and "data.features=" not in err, err


@pytest.mark.parametrize("weights", ["best.ckpt", "init.pth"])
def test_resume_refuses_weights_only_files(task, one_epoch, tmp_path, capsys, weights):
    path = one_epoch / "checkpoints" / weights if weights == "best.ckpt" else task["ckpt"]
    err = _fails(capsys, _args(task, tmp_path, "--resume", path))
    assert "weights only" in err and f"use --ckpt {path}" in err


def test_resume_of_a_finished_run_trains_nothing_and_says_so(task, one_epoch, capsys):
    err = _fails(capsys, _args(task, one_epoch, "--val", task["pairs"], "--max-epochs", "1", "--resume",
                               one_epoch / "checkpoints" / "last.ckpt"))
    assert "nothing left to train" in err and "trainer.max_epochs=1" in err


def test_a_new_run_into_a_used_output_folder_is_refused(task, one_epoch, capsys):
    err = _fails(capsys, _args(task, one_epoch, "--val", task["pairs"]))
    assert f"{one_epoch / 'checkpoints' / 'last.ckpt'} exists" in err and "--resume" in err


def test_resume_with_more_epochs_trains_them_on_the_new_schedule(task, one_epoch, tmp_path, capsys):
    import shutil

    out = tmp_path / "more"
    shutil.copytree(one_epoch / "checkpoints", out / "checkpoints")
    capsys.readouterr()
    assert train.main(_args(task, out, "--val", task["pairs"], "--max-epochs", "2", "--resume",
                            out / "checkpoints" / "last.ckpt")) == 0
    said = capsys.readouterr().out
    assert "Resuming with trainer.max_epochs=2 (the checkpoint's run: 1)" in said
    assert _last(out)["global_step"] == 2 * STEPS_PER_EPOCH
    with open(out / "csv" / "metrics.csv") as f:
        rates = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")}
    # BertAdam's warm-up-linear over 8 steps (warm-up 1): step 4 runs at 5e-5 * (8 - 4) / 7, not at the old
    # 4-step schedule's 0 restored with the optimizer.
    assert rates[4] == pytest.approx(5e-5 * 4 / 7, rel=1e-6)
    assert rates[7] == pytest.approx(5e-5 * 1 / 7, rel=1e-6)


# -------------------------------------------------------------------------------------------------- messages
@pytest.mark.parametrize("flags, said", [
    (("--devices", "0"), "argument --devices: must be a positive integer, got 0"),
    (("--max-epochs", "-2"), "trainer.max_epochs=-2: allowed is a whole number >= 1"),
    (("--max-epochs", "0"), "trainer.max_epochs=0: allowed is a whole number >= 1 (epochs; 0 would train nothing"),
    (("trainer.max_steps=0",), "trainer.max_steps=0 is not allowed: -1 (no limit) or a whole number >= 1"),
])
def test_bad_trainer_settings_are_one_line(task, tmp_path, capsys, flags, said):
    assert said in _fails(capsys, _args(task, tmp_path, *flags))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_a_gpu_is_one_line(task, tmp_path, capsys):
    argv = _args(task, tmp_path)
    argv[argv.index("trainer.accelerator=cpu")] = "trainer.accelerator=gpu"
    assert "invalid trainer setting: No supported gpu backend found" in _fails(capsys, argv)


def test_unlabelled_validation_pairs_are_refused(task, tmp_path, capsys):
    img_ids = [row["img_id"] for row in json.loads(task["pairs"].read_text())]
    write_pairs(tmp_path / "unlabelled.json", img_ids, 6, labelled=False)
    err = _fails(capsys, _args(task, tmp_path, "--val", tmp_path / "unlabelled.json"))
    assert "validation pairs (6) have no labels" in err
    positives = [row for row in json.loads(task["pairs"].read_text()) if row["ground"] == "True"]
    (tmp_path / "positives.json").write_text(json.dumps(positives))
    err = _fails(capsys, _args(task, tmp_path, "--val", tmp_path / "positives.json"))
    assert "labelled validation pairs are all label 1" in err


def test_unlabelled_training_pairs_are_refused(task, tmp_path, capsys):
    img_ids = [row["img_id"] for row in json.loads(task["pairs"].read_text())]
    write_pairs(tmp_path / "unlabelled.json", img_ids, 6, labelled=False)
    argv = _args(task, tmp_path)
    argv[argv.index("--train") + 1] = str(tmp_path / "unlabelled.json")
    assert "6 training pairs have no label" in _fails(capsys, argv)


def test_non_finite_validation_stops_training_with_a_message(task, tmp_path, capsys):
    """A diverged model (lr 1e30) scores every validation pair NaN; their ROC-AUC is still a plausible number
    (0.5-ish, from the ties), so without the check training would go on and pick a best.ckpt on meaningless
    scores."""
    err = _fails(capsys, _args(task, tmp_path, "--val", task["pairs"], "--max-epochs", "1", "optim.lr=1e30"))
    assert "training stopped after epoch 0 (global step 4): 32 of 32 validation scores are not finite" in err
    assert f"no checkpoint was written in {tmp_path / 'checkpoints'}" in err


@pytest.mark.slow
def test_interrupt_says_what_was_written(task, tmp_path):
    args = _args(task, tmp_path / "run", "trainer.checkpoint_every_n_steps=2")
    proc = _run(*args, crash=("step:2", "sigint"))
    assert proc.returncode == 130, proc.stderr[-3000:]  # the shell's status for SIGINT, as eval.py
    assert "Traceback" not in proc.stderr
    assert proc.stderr.rstrip().endswith(
        f"train.py: interrupted: training stopped at global step 2; checkpoints: "
        f"{tmp_path / 'run' / 'checkpoints' / 'last.ckpt'} (to continue: --resume)")
