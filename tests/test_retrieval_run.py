"""eval.py --task retrieval end to end: Karpathy captions + a feature TSV, sharded over processes, resumable.

The DDP runs and the killed run are eval.py processes of their own; the other runs (the full grid, errors, resumes,
reruns) call eval.py's `main` in this process (`run_in_process`: the same run, exit status and messages, without ~10 s
of start-up each)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from e2e_helpers import run_in_process, run_script, save_tiny_snapshot
from helpers_features import write_synthetic_tsv

from lxmert_pl.retrieval import Retriever

NUM_IMAGES, NUM_CAPTIONS = 7, 17  # neither a multiple of 2 (the world size) nor of the block sizes


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrieval")
    img_ids = [f"{1000 + i}" for i in range(NUM_IMAGES)]
    records = write_synthetic_tsv(tmp / "obj36.tsv", img_ids, num_boxes=[5, 9, 3, 7, 12, 4, 6], dim=2048, seed=3)
    words = ["dog", "cat", "red car", "two people", "a kite", "green grass", "a bus", "snow", "a boat"]
    caption_image = [j % NUM_IMAGES for j in range(NUM_CAPTIONS)]
    images = [{"filename": f"{img_id}.jpg", "split": "test", "sentences": []} for img_id in img_ids]
    sentences = []
    for i in range(NUM_IMAGES):  # Karpathy order: captions grouped per image
        for j in [j for j in range(NUM_CAPTIONS) if caption_image[j] == i]:
            text = f"{j} times there is {words[j % 9]} and {words[(j * 4) % 9]} here"
            images[i]["sentences"].append({"raw": text})
            sentences.append((i, text))
    images.append({"filename": "99.jpg", "split": "train", "sentences": [{"raw": "not in the test split"}]})
    (tmp / "dataset_flickr30k.json").write_text(json.dumps({"images": images}), encoding="utf-8")
    model = save_tiny_snapshot(tmp / "model_LXRT.pth")
    return {"tmp": tmp, "tsv": tmp / "obj36.tsv", "ckpt": tmp / "model_LXRT.pth",
            "captions": tmp / "dataset_flickr30k.json", "model": model, "records": records,
            "sentences": [t for _, t in sentences], "caption_image": [i for i, _ in sentences]}


def _args(fx, out, *extra, devices=1) -> list:
    return ["--task", "retrieval", "--ckpt", fx["ckpt"], "--captions", fx["captions"], "--split", "test",
            "--features", fx["tsv"], "--out", out, "--accelerator", "cpu", "--devices", str(devices),
            "retrieval.image_block=2", "retrieval.caption_block=5", "data.batch_size=4", *extra]


def _run(fx, out, *extra, devices=1):
    return run_script("eval.py", *_args(fx, out, *extra, devices=devices))


@pytest.fixture
def run_here(fx):
    """`_run` (one process) in this process: run_here(out, *extra)."""
    return lambda out, *extra: run_in_process("eval.py", *_args(fx, out, *extra))


def _reference(fx, k=None):
    features = [r.features for r in fx["records"]]
    boxes = [r.normalized_boxes() for r in fx["records"]]
    return Retriever(fx["model"]).evaluate(fx["sentences"], features, boxes, fx["caption_image"], k=k)


def _summary(out):
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def full_run(fx):
    out = fx["tmp"] / "full"
    proc = run_in_process("eval.py", *_args(fx, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_full_grid_equals_the_retriever(fx, full_run):
    out, proc = full_run
    ref = _reference(fx)
    scores = np.load(out / "scores.npy")
    assert scores.shape == (NUM_IMAGES, NUM_CAPTIONS)
    np.testing.assert_allclose(scores, ref.i2t_scores.numpy(), atol=1e-6)
    summary = _summary(out)
    assert summary["protocol"] == "full_grid" and summary["k"] is None and summary["split"] == "test"
    assert (summary["num_images"], summary["num_captions"]) == (NUM_IMAGES, NUM_CAPTIONS)
    assert summary["pairs_scored"] == summary["pairs_scored_this_run"] == NUM_IMAGES * NUM_CAPTIONS
    for key, value in ref.metrics.items():
        assert summary["metrics"][key] == pytest.approx(value, abs=1e-9), key
    assert 0 <= summary["metrics"]["i2t_R@1"] <= 1 and "i2t_R@1" in proc.stdout
    top = json.loads((out / "top10.json").read_text(encoding="utf-8"))
    i2t = [row for row in top if row["direction"] == "i2t"]
    assert len(i2t) == NUM_IMAGES and len([r for r in top if r["direction"] == "t2i"]) == NUM_CAPTIONS
    row = i2t[0]
    assert row["query_text"] == "1000" and len(row["top"]) == 10
    assert [t["index"] for t in row["top"]] == np.argsort(-scores[0], kind="stable")[:10].tolist()


def test_registry_alias_and_missing_features_are_named(fx, tmp_path, run_here):
    proc = run_here(tmp_path / "x", "--ckpt", "no-such-alias")
    assert proc.returncode == 2 and "no-such-alias" in proc.stderr and "Traceback" not in proc.stderr
    records = fx["records"][:5]
    write_synthetic_tsv(tmp_path / "partial.tsv", [r.img_id for r in records], num_boxes=[3] * 5, dim=2048)
    proc = run_in_process("eval.py", "--task", "retrieval", "--ckpt", fx["ckpt"], "--captions", fx["captions"],
                          "--split", "test", "--features", tmp_path / "partial.tsv", "--out", tmp_path / "p")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "2 of 7 images" in proc.stderr and "1005" in proc.stderr and "partial.tsv" in proc.stderr


def test_resume_scores_only_the_missing_blocks(fx, full_run, tmp_path, run_here):
    out = tmp_path / "resumed"
    proc = run_here(out, "retrieval.max_blocks=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rerun the same command" in proc.stdout and not (out / "metrics.json").exists()
    assert len(list((out / "shards").glob("block_*.npz"))) == 3
    proc = run_here(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(out)
    first_three = 2 * 5 * 3  # blocks 0-2: images 0-1 x captions 0-14
    assert summary["pairs_scored_this_run"] == NUM_IMAGES * NUM_CAPTIONS - first_three
    np.testing.assert_allclose(np.load(out / "scores.npy"), np.load(full_run[0] / "scores.npy"), atol=1e-6)
    proc = run_here(out, "--k", "3")  # other settings in the same folder
    assert proc.returncode == 2 and "made otherwise" in proc.stderr and "settings.k: null -> 3" in proc.stderr


def test_rerun_with_other_weights_or_features_is_refused_or_started_afresh(fx, full_run, tmp_path, monkeypatch):
    """Issue 25's three variants: a resume with other features of the same img_ids (same size, same index), a
    checkpoint replaced at the same path by weights of the same size, a finished folder rerun with other features;
    then --overwrite starts afresh. The fingerprint names what changed."""
    import shutil

    monkeypatch.setenv("LXMERT_PL_HASH_CACHE", str(tmp_path / "sha256.json"))  # for the runs and this test
    other = tmp_path / "other.tsv"
    write_synthetic_tsv(other, [r.img_id for r in fx["records"]], num_boxes=[5, 9, 3, 7, 12, 4, 6], dim=2048, seed=4)
    assert other.stat().st_size == fx["tsv"].stat().st_size
    ckpt = tmp_path / "model_LXRT.pth"
    shutil.copy(fx["ckpt"], ckpt)
    shutil.copy(fx["ckpt"].with_name(fx["ckpt"].name + ".config.json"), ckpt.with_name(ckpt.name + ".config.json"))

    def run(out, *extra, features=fx["tsv"]):
        args = _args(fx, out, *extra)
        args[args.index(fx["ckpt"])], args[args.index(fx["tsv"])] = ckpt, features
        return run_in_process("eval.py", *args)

    out = tmp_path / "partial"  # the uninterrupted run's first 3 blocks only: what an interrupted run leaves
    shutil.copytree(full_run[0] / "shards", out / "shards")
    for path in sorted((out / "shards").glob("block_*.npz"))[3:]:
        path.unlink()
    from lxmert_pl.fingerprint import file_sha256

    file_sha256(ckpt)  # the hash cache knows this path's old content
    save_tiny_snapshot(ckpt, seed=1)  # other weights, same size, same path; and other features of the same img_ids
    assert ckpt.stat().st_size == fx["ckpt"].stat().st_size
    proc = run(out, features=other)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr, proc.stderr[-2000:]
    assert "weights.sha256: " in proc.stderr and "features[0].mtime_ns: " in proc.stderr, proc.stderr[-2000:]
    shutil.copy(fx["ckpt"], ckpt)  # the same weights again (new mtime: hashed again, same sha256)
    proc = run(out, "--overwrite", "--card", tmp_path / "README.md", features=other)
    assert proc.returncode == 0 and "--overwrite: deleting the blocks" in proc.stdout, proc.stderr[-2000:]
    assert _summary(out)["pairs_scored_this_run"] == NUM_IMAGES * NUM_CAPTIONS  # all scored afresh
    card = (tmp_path / "README.md").read_text(encoding="utf-8")  # --card is honoured by retrieval
    assert "### dataset_flickr30k_test" in card and "retrieval, full_grid, itm" in card

    finished = tmp_path / "finished"
    shutil.copytree(full_run[0], finished)
    proc = run(finished, features=other)  # the finished run's metrics are not printed again
    assert proc.returncode == 2 and "features[0]" in proc.stderr and "Retrieval metrics" not in proc.stdout
    assert _summary(finished)["metrics"] == _summary(full_run[0])["metrics"]


@pytest.mark.slow
def test_retrieval_killed_mid_grid_resumes_to_the_uninterrupted_result(fx, full_run, tmp_path, run_here):
    """A real SIGKILL after 4 finished blocks (tests/killed_retrieval.py), then the same command again."""
    import signal
    import subprocess
    import sys

    from e2e_helpers import REPO_ROOT

    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "killed_retrieval.py"), "4", "--",
                             *map(str, _args(fx, out))], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    finished = _shard_pairs(out)
    assert len(list((out / "shards").glob("block_*.npz"))) == 4 and not (out / "metrics.json").exists()
    resumed = run_here(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _summary(out)["pairs_scored_this_run"] == NUM_IMAGES * NUM_CAPTIONS - len(finished)
    np.testing.assert_allclose(np.load(out / "scores.npy"), np.load(full_run[0] / "scores.npy"), atol=1e-6)
    assert _summary(out)["metrics"] == _summary(full_run[0])["metrics"]


def _shard_pairs(out):
    pairs = []
    for path in sorted((out / "shards").glob("block_*.npz")):
        with np.load(path) as data:
            pairs += list(zip(data["image"].tolist(), data["caption"].tolist()))
    return pairs


@pytest.mark.slow
@pytest.mark.parametrize("k", [None, 3])
def test_two_processes_equal_one_and_score_each_pair_once(fx, full_run, tmp_path, run_here, k):
    extra = [] if k is None else ["--k", str(k)]
    one, two = tmp_path / "one", tmp_path / "two"
    if k is None:
        one = full_run[0]  # the same one-process command
    else:
        proc = run_here(one, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run(fx, two, *extra, devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s1, s2 = _summary(one), _summary(two)
    np.testing.assert_allclose(np.load(two / "scores.npy"), np.load(one / "scores.npy"), atol=1e-6)
    for key, value in s1["metrics"].items():
        assert s2["metrics"][key] == pytest.approx(value, abs=1e-6), key
    pairs = _shard_pairs(two)
    assert len(pairs) == len(set(pairs)) == s2["pairs_scored"] == s2["pairs_scored_this_run"]
    assert len(s2["pairs_scored_per_process"]) == 2 and min(s2["pairs_scored_per_process"]) > 0
    if k is None:
        assert len(pairs) == NUM_IMAGES * NUM_CAPTIONS
    else:
        ref = _reference(fx, k)
        expected = torch.isfinite(ref.i2t_scores) | torch.isfinite(ref.t2i_scores)
        assert set(pairs) == set(map(tuple, expected.nonzero().tolist())) and len(pairs) < NUM_IMAGES * NUM_CAPTIONS
        cand = np.load(two / "candidates.npz")
        assert np.array_equal(cand["i2t"], torch.isfinite(ref.i2t_scores).numpy())
    # each process encoded each image it needed once: 7 images in all, none twice on one process
    assert sum(s2["images_encoded_per_process"]) == NUM_IMAGES


@pytest.mark.slow
def test_two_process_run_stopped_and_resumed_equals_uninterrupted(fx, full_run, tmp_path):
    out = tmp_path / "ddp_resume"
    proc = _run(fx, out, "retrieval.max_blocks=2", devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((out / "shards").glob("block_*.npz"))) == 4
    (out / "shards" / "block_000009.npz.tmp").write_bytes(b"half a file")  # what a kill mid-write leaves
    proc = _run(fx, out, devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(out / "scores.npy"), np.load(full_run[0] / "scores.npy"), atol=1e-6)
    assert _summary(out)["pairs_scored_this_run"] == NUM_IMAGES * NUM_CAPTIONS - 2 * 5 * 4


def test_each_image_chunk_is_loaded_once_not_once_per_caption_block():
    from lxmert_pl.retrieval import plan_blocks
    from lxmert_pl.runs.retrieval import BlockDataset

    loaded = []

    def load_images(index):
        loaded.append(list(index))
        return [np.zeros((2, 4), np.float32) for _ in index], [np.zeros((2, 4), np.float32) for _ in index]

    plan = plan_blocks(5, 7, None, image_block=2, caption_block=3)  # 3 image chunks x 3 caption chunks
    dataset = BlockDataset(plan, load_images)
    items = [dataset[i] for i in range(len(plan))]
    assert loaded == [[0, 1], [2, 3], [4]]
    assert [item["features"] is None for item in items] == [False, True, True] * 3
    assert [item["images"] for item in items] == [list(block.images) for block in plan]
