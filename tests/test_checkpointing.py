"""ResumeCheckpoint writes last.ckpt atomically: a crash while writing leaves the previous one whole."""

from __future__ import annotations

import pytest

from lxmert_pl.runs.checkpointing import ResumeCheckpoint


class StubTrainer:
    """What `_save` uses of a Trainer: save_checkpoint (full state) and is_global_zero."""

    def __init__(self, payload: bytes, fail: bool = False, is_global_zero: bool = True):
        self.payload, self.fail, self.is_global_zero = payload, fail, is_global_zero
        self.calls = []

    def save_checkpoint(self, path, weights_only=None):
        self.calls.append(weights_only)
        with open(path, "wb") as handle:
            handle.write(self.payload[: len(self.payload) // 2])
            if self.fail:
                raise KeyboardInterrupt("killed mid-write")
            handle.write(self.payload[len(self.payload) // 2 :])


def test_last_ckpt_is_replaced_whole(tmp_path):
    callback = ResumeCheckpoint(tmp_path / "last.ckpt")
    trainer = StubTrainer(b"step-1 state")
    callback._save(trainer)
    assert (tmp_path / "last.ckpt").read_bytes() == b"step-1 state"
    assert trainer.calls == [False]  # full state (optimizer, schedule, loops), said explicitly
    callback._save(StubTrainer(b"step-2 state"))
    assert (tmp_path / "last.ckpt").read_bytes() == b"step-2 state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_crash_while_writing_keeps_the_previous_last_ckpt(tmp_path):
    callback = ResumeCheckpoint(tmp_path / "last.ckpt")
    callback._save(StubTrainer(b"step-1 state"))
    with pytest.raises(KeyboardInterrupt):
        callback._save(StubTrainer(b"step-2 state, longer", fail=True))
    assert (tmp_path / "last.ckpt").read_bytes() == b"step-1 state"


def test_only_rank_zero_renames(tmp_path):
    callback = ResumeCheckpoint(tmp_path / "last.ckpt")
    callback._save(StubTrainer(b"rank 1 never writes", is_global_zero=False))
    assert not (tmp_path / "last.ckpt").exists()
