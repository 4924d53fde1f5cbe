"""Tiny checkpoints, feature files and pair files for end-to-end tests of eval.py / train.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from lxmert_pl.model import LxmertMatchingModel, get_preset
from helpers_features import write_synthetic_tsv

REPO_ROOT = Path(__file__).resolve().parents[1]


def save_tiny_snapshot(path: Path, seed: int = 0, heads=("matching", "lm", "obj", "qa")) -> LxmertMatchingModel:
    """An original-format pretraining snapshot (`module.` keys) with its config beside it, O(1) activations."""
    torch.manual_seed(seed)
    model = LxmertMatchingModel(get_preset("tiny"), heads=heads)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    path.with_name(path.name + ".config.json").write_text(json.dumps(model.config.to_dict()))
    return model.eval()


def save_vqa_snapshot(path: Path, model: LxmertMatchingModel) -> None:
    """The original fine-tuned format: encoder under lxrt_encoder.model.bert, a VQA head, no matching head."""
    state = {"lxrt_encoder.model." + k: v for k, v in model.bert.state_dict(prefix="bert.").items()}
    h = model.config.hidden_size
    state.update({"logit_fc.0.weight": torch.randn(2 * h, h), "logit_fc.0.bias": torch.zeros(2 * h),
                  "logit_fc.2.weight": torch.ones(2 * h), "logit_fc.2.bias": torch.zeros(2 * h),
                  "logit_fc.3.weight": torch.randn(9, 2 * h), "logit_fc.3.bias": torch.zeros(9)})
    torch.save(state, path)
    path.with_name(path.name + ".config.json").write_text(json.dumps(model.config.to_dict()))


def write_pairs(path: Path, img_ids: list[str], count: int, labelled: bool = True) -> list[dict]:
    words = ["dog", "cat", "red car", "two people", "a kite", "green grass", "a bus"]
    rows = []
    for k in range(count):
        row = {"question_id": 1000 + k, "img_id": img_ids[k % len(img_ids)], "sent": f"there is {words[k % 7]} here",
               "answer_type": "yes/no"}
        if labelled:
            row["ground"] = "True" if (k * 7) % 3 == 0 else "False"
            row["label"] = {"yes": 1} if row["ground"] == "True" else {"no": 1}
        rows.append(row)
    path.write_text(json.dumps(rows))
    return rows


def make_eval_fixture(tmp: Path, num_pairs: int = 13) -> dict:
    img_ids = [f"COCO_val2014_{i:012d}" for i in range(5)]
    records = write_synthetic_tsv(tmp / "val_obj36.tsv", img_ids, num_boxes=[10, 36, 5, 20, 36], dim=2048)
    model = save_tiny_snapshot(tmp / "model_LXRT.pth")
    pairs = write_pairs(tmp / "pairs.json", img_ids, num_pairs)
    return {"tsv": tmp / "val_obj36.tsv", "ckpt": tmp / "model_LXRT.pth", "pairs": tmp / "pairs.json",
            "records": {r.img_id: r for r in records}, "model": model, "pair_rows": pairs}


def run_script(script: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for key in ("WANDB_API_KEY", "WANDB_MODE"):  # no credentials, no forced mode: as on a fresh machine
        full_env.pop(key, None)
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class FinishedRun:
    """What `run_in_process` returns: the fields of `subprocess.CompletedProcess` that the tests read."""

    returncode: int
    stdout: str
    stderr: str


_ENTRY_POINTS: dict[str, ModuleType] = {}


def entry_point(script: str) -> ModuleType:
    """The repository's `eval.py` / `train.py` / `extract.py` as a module (loaded once), to call its `main`."""
    if script not in _ENTRY_POINTS:
        from conftest import load_script

        _ENTRY_POINTS[script] = load_script(REPO_ROOT / script, f"{Path(script).stem}_in_process")
    return _ENTRY_POINTS[script]


def call_main(script: str, *args) -> int:
    """`python SCRIPT ARGS...` in this process: the entry point's `main(argv)` with `sys.argv` as that process would
    have it (runs record their command from it); its exit status (0, or the code of its SystemExit: 2 for a user
    error, 130 for an interrupt)."""
    argv = [str(a) for a in args]
    saved, sys.argv = sys.argv, [str(REPO_ROOT / script), *argv]
    try:
        return entry_point(script).main(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        sys.argv = saved


def run_in_process(script: str, *args) -> FinishedRun:
    """`run_script` in this process (`call_main`), with what it printed. No interpreter start-up and no imports paid
    again (~6 s a run): for checks of what a run computes, writes and says. The CLI's own behaviour (the status of a
    real process, signals, DDP's launched processes, wandb's global state) stays with `run_script`. A bug still ends
    the test, with its exception (a process would print the traceback and exit 1)."""
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        code = call_main(script, *args)
    return FinishedRun(code, out.getvalue(), err.getvalue())


def read_wandb_summary(run_dir: Path) -> dict:
    """The summary an offline wandb run recorded, read from its `run-*.wandb` log (LevelDB log format of protobuf
    `Record`s: 32 KiB blocks, 7-byte record headers) — offline runs of wandb >= 0.2x write no wandb-summary.json."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    summary = {}
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


COLOURS = ["red", "green", "blue", "yellow", "purple", "white"]
SHAPES = ["circle", "square", "triangle", "star"]


def write_shape_task(tmp: Path, num_images: int, seed: int = 0, dim: int = 2048, prefix: str = "img",
                     max_objects: int = 1) -> dict:
    """A matching task that is learnable from features and boxes: each box's feature encodes its object's colour
    and shape (plus noise); a caption names one object of the image ("a red circle") or, for a negative, a
    colour and a shape the image does not hold. Returns paths of the TSV and the labelled pair file."""
    import numpy as np

    from lxmert_pl.features import ImageFeatures, TsvWriter

    code = np.random.default_rng(1234).standard_normal((len(COLOURS) + len(SHAPES), dim)).astype(np.float32)
    rng = np.random.default_rng(seed)  # the colour/shape code above is shared by every split
    pairs, records = [], []
    for i in range(num_images):
        n = int(rng.integers(1, max_objects + 1))
        objects = [(int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES)))) for _ in range(n)]
        feats = np.stack([code[c] + code[len(COLOURS) + s] + 0.3 * rng.standard_normal(dim) for c, s in objects])
        xy = rng.uniform(0, 60, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 40, (n, 2))], 1).astype(np.float32)
        img_id = f"{prefix}{i:05d}"
        records.append(ImageFeatures(img_id, 100, 100, np.zeros(n, np.int64), np.ones(n, np.float32),
                                     np.zeros(n, np.int64), np.ones(n, np.float32), boxes,
                                     np.maximum(feats, 0).astype(np.float32)))
        c, s = objects[int(rng.integers(n))]
        pairs.append({"img_id": img_id, "sent": f"a {COLOURS[c]} {SHAPES[s]}", "ground": "True"})
        while True:
            c, s = int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES)))
            if all(c != oc and s != os_ for oc, os_ in objects):  # neither the colour nor the shape is there
                break
        pairs.append({"img_id": img_id, "sent": f"a {COLOURS[c]} {SHAPES[s]}", "ground": "False"})
    for k, row in enumerate(pairs):
        row["question_id"] = k
    tsv = tmp / f"{prefix}_obj.tsv"
    with TsvWriter(tsv, append=False) as writer:
        for record in records:
            writer.write(record)
    pair_file = tmp / f"{prefix}_pairs.json"
    pair_file.write_text(json.dumps(pairs))
    return {"tsv": tsv, "pairs": pair_file}
