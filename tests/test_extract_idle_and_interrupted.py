"""extract.py with ranks that have nothing to do, and Ctrl-C (docs/reliability.md, docs/scale.md).

More processes than images left (a fresh run on 1 image, or a resume where one rank's shard is complete): the idle
rank runs an empty step, waits at the merge and exits 0; the output is the one-process TSV byte for byte. Ctrl-C
(one process, and two where it reaches every process of the group, as a terminal sends it): one line saying
"interrupted" and what is on disk, exit 130; the same command then completes to the uninterrupted TSV.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
from conftest import load_script

from lxmert_pl.detector import save_tiny_detector
from lxmert_pl.detector.random_weights import synthetic_image
from lxmert_pl.features import TsvWriter, read_img_ids

REPO_ROOT = Path(__file__).resolve().parents[1]
extract = load_script(REPO_ROOT / "extract.py", "extract_entry_point")


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    return save_tiny_detector(tmp_path_factory.mktemp("det") / "tiny", seed=0, min_size_test=96, max_size_test=640)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """a_small.png (global rank 0's share of two processes) and two large images (rank 1's: slow to detect)."""
    directory = tmp_path_factory.mktemp("images")
    cv2.imwrite(str(directory / "a_small.png"), synthetic_image(seed=0, height=60, width=80))
    for k, name in enumerate(("b_large", "c_large")):
        cv2.imwrite(str(directory / f"{name}.png"), synthetic_image(seed=k + 1, height=480, width=640))
    return directory


def _argv(images: Path, out: Path, detector: Path) -> list[str]:
    return ["--images", str(images), "--out", str(out), "--detector", str(detector), "--accelerator", "cpu"]


@pytest.fixture(scope="module")
def reference(images, detector, tmp_path_factory, one_torch_thread) -> Path:
    """The one-process TSV of the three images."""
    out = tmp_path_factory.mktemp("one") / "feats.tsv"
    assert extract.main(_argv(images, out, detector)) == 0
    return out


def test_ctrl_c_during_a_one_process_extraction(images, detector, reference, tmp_path, capsys, monkeypatch):
    """A real SIGINT after the first row: "interrupted", what is on disk, exit 130; the same command resumes."""
    out = tmp_path / "feats.tsv"
    write = TsvWriter.write

    def write_then_ctrl_c(self, features) -> None:
        write(self, features)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(TsvWriter, "write", write_then_ctrl_c)
    try:
        with pytest.raises(SystemExit) as ended:
            extract.main(_argv(images, out, detector))
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores SIGINT after an interrupt
    monkeypatch.undo()
    assert ended.value.code == 130
    err = capsys.readouterr().err
    assert f"extract.py: interrupted: {out} holds 1 of 3 images. Run the same command again" in err
    assert read_img_ids(out) == ["a_small"]
    assert extract.main(_argv(images, out, detector)) == 0
    assert out.read_bytes() == reference.read_bytes()


def _two_processes(argv: list[str], **popen) -> subprocess.Popen:
    """extract.py --devices 2: global rank 0 here, rank 1 started by Lightning's launcher (same process group)."""
    command = [sys.executable, "extract.py", *argv, "--devices", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


@pytest.mark.slow
def test_two_processes_on_one_image(images, detector, reference, tmp_path):
    """Fewer images than processes: rank 0's share is empty; it waits for rank 1 and merges."""
    (tmp_path / "one").mkdir()
    os.link(images / "a_small.png", tmp_path / "one" / "a_small.png")
    out = tmp_path / "feats.tsv"
    run = _two_processes(_argv(tmp_path / "one", out, detector))
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    assert "rank 0: 0, rank 1: 1 (" in stdout and "wrote 1 rows" in stdout
    assert out.read_bytes() == reference.read_bytes().splitlines(keepends=True)[0]
    assert not list(tmp_path.glob("feats.tsv.shard*")) and not (tmp_path / "feats.tsv.shards.json").exists()


@pytest.mark.slow
def test_ctrl_c_on_two_processes_then_resume_with_a_complete_shard(images, detector, reference, tmp_path):
    """Ctrl-C to the process group once rank 0's shard is complete (rank 1 is still on its large images): exit 130,
    "interrupted", the shards kept. The same command: rank 0 has nothing left, waits; rank 1 finishes its shard."""
    out = tmp_path / "feats.tsv"
    shards = [tmp_path / f"feats.tsv.shard{k}.tsv" for k in (0, 1)]
    run = _two_processes(_argv(images, out, detector), start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and run.poll() is None:
        if shards[0].exists() and read_img_ids(shards[0]):
            break
        time.sleep(0.02)
    assert run.poll() is None, "the run ended before it could be interrupted"
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: every process of the foreground group
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr[-3000:]
    assert "extract.py: interrupted: the rows extracted so far are in the shard files" in stderr
    assert read_img_ids(shards[0]) == ["a_small"] and len(read_img_ids(shards[1])) < 2
    assert not out.exists() or not read_img_ids(out)

    run = _two_processes(_argv(images, out, detector))
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    assert "resuming the 2 shard file(s) of an interrupted run with the same plan" in stdout
    assert "rank 0: 0, rank 1: " in stdout
    assert out.read_bytes() == reference.read_bytes()
    assert not list(tmp_path.glob("feats.tsv.shard*")) and not (tmp_path / "feats.tsv.shards.json").exists()


def test_extraction_and_sharded_import_in_one_direction():
    """sharded.py (the run on Lightning's predict loop, with run_extraction) builds on extraction.py (the per-image
    engine and the output's files); extraction.py never imports it back, not even inside a function."""
    from test_architecture import PACKAGE, imported_modules

    detector = PACKAGE / "detector"
    assert "lxmert_pl.detector.extraction" in imported_modules(detector / "sharded.py")
    assert "lxmert_pl.detector.sharded" not in imported_modules(detector / "extraction.py")
