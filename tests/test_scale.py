"""Runs across nodes (docs/scale.md): two "nodes" simulated on this machine, as torchrun or SLURM would start them.

Each node is a process of the real entry point with the variables of a general cluster (MASTER_ADDR=127.0.0.1,
MASTER_PORT, NODE_RANK=0/1, WORLD_SIZE=2, LOCAL_RANK=0) and `--accelerator cpu --devices 1 --num-nodes 2` (gloo);
one extraction test goes through torchrun itself (`python -m torch.distributed.run --nnodes 2 --node-rank K`).
Their outputs must be those of one process: the same TSV bytes, the same predictions. The one-process references
run the entry point's `main` in this process, on one torch thread (as OMP_NUM_THREADS=1 gives the nodes).
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from e2e_helpers import REPO_ROOT, entry_point, make_eval_fixture
from omegaconf import OmegaConf

from lxmert_pl.detector import OBJ36, load_detector, save_tiny_detector
from lxmert_pl.detector.extraction import ExtractionJob, detector_file_digests, extraction_settings, list_images
from lxmert_pl.detector.sharded import ShardedExtraction
from lxmert_pl.detector.random_weights import synthetic_image
from lxmert_pl.errors import ConfigError
from lxmert_pl.features import iter_tsv_features, read_img_ids
from lxmert_pl.runs.placement import choose_strategy

NUM_IMAGES = 7
NODE_FLAGS = ("--accelerator", "cpu", "--devices", "1", "--num-nodes", "2")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_NTASKS", "WANDB_API_KEY", "WANDB_MODE")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _start_nodes(script: str, args: list, launcher: str = "env") -> list[subprocess.Popen]:
    """Two processes of `script`, node 0 and node 1 of a two-node run, one device each."""
    port = str(_free_port())
    processes = []
    for node in (0, 1):
        if launcher == "torchrun":
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                       "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port, script]
            env = _env()
        else:
            command = [sys.executable, script]
            env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NODE_RANK=str(node), WORLD_SIZE="2", LOCAL_RANK="0")
        processes.append(subprocess.Popen([*command, *map(str, args), *NODE_FLAGS], cwd=REPO_ROOT, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return processes


def _run_nodes(script: str, args: list, launcher: str = "env", timeout: float = 300) -> list[str]:
    """Run both nodes to the end; their outputs (each must exit 0)."""
    processes = _start_nodes(script, args, launcher)
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout)[0])
    finally:
        for process in processes:
            process.kill()
    for node, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"node {node} failed:\n{output[-3000:]}"
    return outputs


# ---- extraction ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Seven small images of different sizes and one unreadable file (skipped and listed)."""
    directory = tmp_path_factory.mktemp("images")
    for k in range(NUM_IMAGES):
        cv2.imwrite(str(directory / f"img_{k}.png"), synthetic_image(seed=k, height=60 + 10 * k, width=80 + 5 * k))
    (directory / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return directory


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    return save_tiny_detector(tmp_path_factory.mktemp("det") / "tiny", seed=0, min_size_test=96, max_size_test=160)


def _extract_here(*args) -> None:
    """extract.py in this process (a one-process reference)."""
    assert entry_point("extract.py").main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def one_process(images, detector, tmp_path_factory, one_torch_thread) -> Path:
    out = tmp_path_factory.mktemp("one") / "feats.tsv"
    _extract_here("--images", images, "--out", out, "--detector", detector, "--accelerator", "cpu")
    return out


def _same_extraction(out: Path, reference: Path) -> None:
    assert out.read_bytes() == reference.read_bytes()
    meta = Path(f"{out}.meta.json")
    assert json.loads(meta.read_text()) == json.loads(Path(f"{reference}.meta.json").read_text())
    assert Path(f"{out}.skipped.txt").read_text() == Path(f"{reference}.skipped.txt").read_text()
    assert not list(out.parent.glob(f"{out.name}.shard*")) and not Path(f"{out}.shards.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["env", "torchrun"])
def test_two_node_extraction_writes_the_one_process_tsv(images, detector, one_process, tmp_path, launcher):
    out = tmp_path / "feats.tsv"
    logs = _run_nodes("extract.py", ["--images", images, "--out", out, "--detector", detector], launcher)
    assert "2 process(es)" in logs[0] and f"wrote {NUM_IMAGES} rows" in logs[0]
    assert "extract [rank 1/2]" in logs[1]
    assert read_img_ids(out) == [f"img_{k}" for k in range(NUM_IMAGES)]
    _same_extraction(out, one_process)


@pytest.mark.slow
def test_two_node_extraction_killed_mid_shard_resumes_to_the_uninterrupted_tsv(images, tmp_path, one_torch_thread):
    """A real SIGKILL of both nodes while their shards fill, then the same two-node command again."""
    slow = save_tiny_detector(tmp_path / "slow", seed=0, min_size_test=320, max_size_test=640)  # ~0.3 s per image
    reference = tmp_path / "one" / "feats.tsv"
    _extract_here("--images", images, "--out", reference, "--detector", slow, "--accelerator", "cpu")

    out = tmp_path / "two" / "feats.tsv"
    args = ["--images", images, "--out", out, "--detector", slow]
    shards = [out.with_name(f"feats.tsv.shard{k}.tsv") for k in (0, 1)]
    processes = _start_nodes("extract.py", args)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and all(p.poll() is None for p in processes):
        if any(s.exists() and read_img_ids(s) for s in shards):
            break
        time.sleep(0.02)
    running = [p.poll() is None for p in processes]
    for process in processes:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    assert all(running), "a node ended before it could be killed"
    done = {s.name: read_img_ids(s) for s in shards if s.exists()}
    assert 1 <= sum(map(len, done.values())) < NUM_IMAGES, done
    assert not out.exists() or not read_img_ids(out)  # nothing merged yet: the kill came mid-shard
    with open(next(s for s in shards if s.exists() and read_img_ids(s)), "ab") as handle:
        handle.write(b"img_9\t100\t100\tAAAA")  # what a kill during a write leaves: a partial last line

    logs = _run_nodes("extract.py", args)
    assert "resuming the" in logs[0] and "shard file(s) of an interrupted run with the same plan" in logs[0]
    resumed = "".join(logs)
    assert "rank 0: resuming" in resumed or "rank 1: resuming" in resumed
    _same_extraction(out, reference)


def test_choose_strategy():
    def strategy(**trainer):
        return choose_strategy(OmegaConf.create({"devices": 1, "num_nodes": 1, "strategy": "auto", **trainer}))

    assert strategy() == "auto"
    many = strategy(num_nodes=2, ddp_timeout_minutes=90)
    assert type(many).__name__ == "DDPStrategy" and many._timeout.total_seconds() == 90 * 60
    assert strategy(devices=2)._ddp_kwargs == {"find_unused_parameters": False}
    unused = choose_strategy(OmegaConf.create({"devices": 2, "num_nodes": 1}), find_unused_parameters=True)
    assert unused._ddp_kwargs == {"find_unused_parameters": True}
    assert strategy(devices=2, strategy="ddp_spawn") == "ddp_spawn"


def test_extraction_refuses_a_strategy_that_spawns_its_processes(images, detector, tmp_path):
    """ddp_spawn/ddp_fork run the work in processes started inside trainer.predict: nothing could merge after."""
    import pytorch_lightning as pl

    model, report = load_detector(detector)
    settings = extraction_settings(model, str(detector), detector_file_digests(report), OBJ36, None, None)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    module = ShardedExtraction(model, list_images(images), tmp_path / "x.tsv", settings, ExtractionJob(OBJ36, None, 1))
    with pytest.raises(ConfigError, match="strategy=ddp"):
        module.run(trainer)
    assert not (tmp_path / "x.tsv").exists()


# ---- evaluation ----------------------------------------------------------------------------------------------------
def _predictions(out: Path) -> list[dict]:
    return json.loads((out / "predictions.json").read_text())


def _same_predictions(out: Path, reference: Path) -> None:
    one, two = _predictions(reference), _predictions(out)
    assert [p["question_id"] for p in two] == [p["question_id"] for p in one]
    np.testing.assert_allclose([p["score"] for p in two], [p["score"] for p in one], atol=1e-6)
    m1 = json.loads((reference / "metrics.json").read_text())["metrics"]
    m2 = json.loads((out / "metrics.json").read_text())["metrics"]
    assert m1.keys() == m2.keys() and all(m2[k] == pytest.approx(m1[k], abs=1e-6) for k in m1)


@pytest.mark.slow
def _eval_here(*args) -> None:
    """eval.py in this process (a one-process reference)."""
    assert entry_point("eval.py").main([str(a) for a in args]) == 0


def test_two_node_eval_on_features_matches_one_process(tmp_path, one_torch_thread):
    (tmp_path / "fx").mkdir()
    fx = make_eval_fixture(tmp_path / "fx")
    args = ["--ckpt", fx["ckpt"], "--pairs", fx["pairs"], "--features", fx["tsv"], "data.batch_size=4"]
    _eval_here(*args, "--out", tmp_path / "one", "--accelerator", "cpu")
    logs = _run_nodes("eval.py", [*args, "--out", tmp_path / "two"])
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]
    assert len(_predictions(tmp_path / "two")) == 13
    _same_predictions(tmp_path / "two", tmp_path / "one")


def _same_rows(tsv: Path, reference: Path) -> None:
    """The same rows in the same order (features within float rounding: images after a cut may be batched anew)."""
    rows, expected = list(iter_tsv_features(tsv)), list(iter_tsv_features(reference))
    assert [r.img_id for r in rows] == [r.img_id for r in expected]
    for row, want in zip(rows, expected):
        np.testing.assert_allclose(row.boxes, want.boxes, atol=1e-4)
        np.testing.assert_allclose(row.features, want.features, atol=1e-5)


def _detections(log: Path) -> list[tuple[str, str]]:
    """(node, img_id) of every image a detector ran on, as tests/counted_eval.py logged them (all runs, all nodes)."""
    return [(node, img_id) for node, _, img_id in (line.split("\t") for line in log.read_text().splitlines())]


def _demo_detector_or_skip() -> None:
    if not (REPO_ROOT / "checkpoints" / "demo" / "frcnn" / "config.yaml").exists():
        pytest.skip("bundled demo detector absent (checkpoints/demo/frcnn): make it with scripts/make_demo.py")


@pytest.mark.slow
def test_two_node_one_step_eval_matches_one_process(tmp_path, one_torch_thread):
    """--images without the cache: each distinct image is detected once, by the node that owns it, and handed to the
    node whose pairs need it."""
    sample = REPO_ROOT / "data" / "sample"
    _demo_detector_or_skip()
    pairs = json.loads((sample / "val_pairs.json").read_text())
    chosen = sorted({p["img_id"] for p in pairs})[:4]
    (tmp_path / "images").mkdir()
    for img_id in chosen:
        shutil.copy(sample / "images" / "val" / f"{img_id}.png", tmp_path / "images")
    (tmp_path / "pairs.json").write_text(json.dumps([p for p in pairs if p["img_id"] in chosen]))
    args = ["--ckpt", "demo-lxrt", "--pairs", tmp_path / "pairs.json", "--images", tmp_path / "images",
            "--given-boxes", sample / "boxes.json", "data.batch_size=4", "detector.cache=false",
            # the scoring's detections are counted: without the cache, report.html's cards re-detect the images of
            # the shown pairs that rank 0 did not hold (a display cost, not the scoring's)
            "report=false"]
    _eval_here(*args, "--out", tmp_path / "one", "--accelerator", "cpu")
    log = tmp_path / "detections.txt"
    logs = _run_nodes("tests/counted_eval.py", [log, 0, "--", *args, "--out", tmp_path / "two"])
    _same_predictions(tmp_path / "two", tmp_path / "one")
    assert not (tmp_path / "two" / "image_features.tsv").exists()
    detected = _detections(log)
    assert sorted(img_id for _, img_id in detected) == chosen  # each image once, across the nodes
    assert Counter(node for node, _ in detected) == {"0": 2, "1": 2}
    assert "detected 4 images on 2 process(es)" in logs[0] and "img/s overall" in logs[0]


VAL_SUBSET = 40  # images of the bundled val set for the killed-node run: 20 per node, 5 detector batches each


@pytest.fixture(scope="module")
def val_subset(tmp_path_factory) -> dict:
    """The first VAL_SUBSET images of the bundled val set (by id) and the val pairs that name them; `args`: eval.py's
    one-step arguments on them."""
    _demo_detector_or_skip()
    sample = REPO_ROOT / "data" / "sample"
    pairs = json.loads((sample / "val_pairs.json").read_text())
    chosen = sorted({p["img_id"] for p in pairs})[:VAL_SUBSET]
    tmp = tmp_path_factory.mktemp("val_subset")
    (tmp / "images").mkdir()
    for img_id in chosen:
        shutil.copy(sample / "images" / "val" / f"{img_id}.png", tmp / "images")
    (tmp / "pairs.json").write_text(json.dumps([p for p in pairs if p["img_id"] in chosen]))
    return {"ids": chosen, "args": ["--ckpt", "demo-lxrt", "--pairs", tmp / "pairs.json", "--images", tmp / "images"]}


@pytest.fixture(scope="module")
def one_step_reference(val_subset, tmp_path_factory, one_torch_thread) -> Path:
    """One-step eval of the val subset in one process (in this one: no start-up)."""
    out = tmp_path_factory.mktemp("one_step") / "one"
    _eval_here(*val_subset["args"], "--out", out, "--accelerator", "cpu")
    return out


@pytest.mark.slow
def test_two_node_one_step_eval_shares_the_detection_and_resumes_a_killed_node(val_subset, one_step_reference,
                                                                               tmp_path):
    """The val subset (40 images) on two nodes with the cache: each node detects its half of the distinct images into
    its shard of the cache. Node 1 is SIGKILLed after 12 of its 20 rows, a whole number of detector batches (4), so no
    detection is lost in flight (node 0 ends at the gather that follows its share); the same command then resumes
    both shards (node 0's is complete: it waits) and ends with the one-process result. Every image is detected
    exactly once over both runs (counted by tests/counted_eval.py)."""
    out, log = tmp_path / "two", tmp_path / "detections.txt"
    cache = out / "image_features.tsv"
    shards = [out / f"image_features.tsv.shard{k}.tsv" for k in (0, 1)]
    args = [*val_subset["args"], "--out", out]
    processes = _start_nodes("tests/counted_eval.py", [log, 12, "--", *args])
    try:
        killed = processes[1].communicate(timeout=300)[0]
        assert processes[1].returncode == -signal.SIGKILL, killed[-3000:]
        try:
            processes[0].communicate(timeout=90)  # its peer is gone: the gather after its share fails
        except subprocess.TimeoutExpired:
            pass
    finally:
        for process in processes:
            process.kill()
            process.communicate()
    assert [len(read_img_ids(shard)) for shard in shards] == [20, 12]
    assert not cache.exists() or not read_img_ids(cache)  # nothing merged: the kill came before the merge

    logs = _run_nodes("tests/counted_eval.py", [log, 0, "--", *args])
    assert "resuming the 2 shard file(s) of an interrupted run" in logs[0]
    assert "rank 0: resuming" in logs[0] and "rank 1: resuming" in logs[1]
    assert "detected 8 images on 2 process(es)" in logs[0] and "rank 0: 0, rank 1: 8 (" in logs[0]
    _same_predictions(out, one_step_reference)
    _same_rows(cache, one_step_reference / "image_features.tsv")
    assert not list(out.glob("image_features.tsv.shard*")) and not (out / "image_features.tsv.shards.json").exists()
    detected = _detections(log)
    assert len(val_subset["ids"]) == VAL_SUBSET and sorted(img_id for _, img_id in detected) == val_subset["ids"]
    per_node = Counter(node for node, _ in detected)  # each image exactly once, about half on each node
    assert 16 <= per_node["0"] <= 24 and 16 <= per_node["1"] <= 24, per_node


@pytest.mark.slow
def test_two_node_one_step_retrieval_detects_each_image_once(tmp_path, one_torch_thread):
    """eval.py --task retrieval --images on two nodes: the images are shared out as for matching (each detected once,
    into the shards of the cache), every node reads them all; scores equal one process."""
    _demo_detector_or_skip()
    sample = REPO_ROOT / "data" / "sample"
    captions = json.loads((sample / "captions_val.json").read_text())[:6]
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    (tmp_path / "images").mkdir()
    for entry in captions:
        shutil.copy(sample / "images" / "val" / f"{entry['img_id']}.png", tmp_path / "images")
    args = ["--task", "retrieval", "--ckpt", "demo-lxrt", "--captions", str(tmp_path / "captions.json"),
            "--images", str(tmp_path / "images")]
    _eval_here(*args, "--out", tmp_path / "one", "--accelerator", "cpu")
    log = tmp_path / "detections.txt"
    logs = _run_nodes("tests/counted_eval.py", [log, 0, "--", *args, "--out", tmp_path / "two"])
    assert "detected 6 images on 2 process(es)" in logs[0] and "rank 0: 3 (" in logs[0]
    np.testing.assert_allclose(np.load(tmp_path / "two" / "scores.npy"), np.load(tmp_path / "one" / "scores.npy"),
                               atol=1e-6)
    detected = _detections(log)
    assert sorted(img_id for _, img_id in detected) == sorted(entry["img_id"] for entry in captions)
    assert Counter(node for node, _ in detected) == {"0": 3, "1": 3}
    _same_rows(tmp_path / "two" / "image_features.tsv", tmp_path / "one" / "image_features.tsv")
