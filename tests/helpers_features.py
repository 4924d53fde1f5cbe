"""Synthetic detections and feature TSVs for tests (small, deterministic, written through `TsvWriter`)."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lxmert_pl.features import ImageFeatures, TsvWriter

ARRAY_FIELDS = ("objects_id", "objects_conf", "attrs_id", "attrs_conf", "boxes", "features")


def make_image_features(img_id: str, num_boxes: int, dim: int, rng: np.random.Generator) -> ImageFeatures:
    """Random but valid detections of one image: boxes inside the image, ids in the detector's class ranges."""
    img_h, img_w = (int(v) for v in rng.integers(200, 641, size=2))
    x1 = rng.uniform(0, img_w / 2, num_boxes)
    y1 = rng.uniform(0, img_h / 2, num_boxes)
    x2 = rng.uniform(x1 + 1, img_w)
    y2 = rng.uniform(y1 + 1, img_h)
    return ImageFeatures(
        img_id=img_id,
        img_h=img_h,
        img_w=img_w,
        objects_id=rng.integers(0, 1600, num_boxes).astype(np.int64),
        objects_conf=rng.uniform(0, 1, num_boxes).astype(np.float32),
        attrs_id=rng.integers(0, 400, num_boxes).astype(np.int64),
        attrs_conf=rng.uniform(0, 1, num_boxes).astype(np.float32),
        boxes=np.stack([x1, y1, x2, y2], axis=1).astype(np.float32),
        features=rng.standard_normal((num_boxes, dim)).astype(np.float32),
    )


def write_synthetic_tsv(
    path: str | Path,
    img_ids: Sequence[str],
    num_boxes: int | Sequence[int] = 36,
    dim: int = 2048,
    seed: int = 0,
) -> list[ImageFeatures]:
    """Write one row per img_id (a fresh file) and return the records written, in order.

    `num_boxes` is one count for all images or one per image.
    """
    counts = [num_boxes] * len(img_ids) if isinstance(num_boxes, int) else list(num_boxes)
    if len(counts) != len(img_ids):
        raise ValueError(f"{len(counts)} box counts for {len(img_ids)} img_ids")
    rng = np.random.default_rng(seed)
    records = [make_image_features(img_id, count, dim, rng) for img_id, count in zip(img_ids, counts)]
    with TsvWriter(path, append=False) as writer:
        for record in records:
            writer.write(record)
    return records


def random_images(n: int, seed: int = 0, min_boxes: int = 2, max_boxes: int = 12, dim: int = 2048):
    """`n` images with min_boxes..max_boxes-1 boxes each: ReLU'd Gaussian features [n_i, dim] and normalised boxes
    [n_i, 4] (x1 < x2, y1 < y2 inside [0, 1]), as per-image lists for the scoring APIs."""
    g = np.random.default_rng(seed)
    counts = g.integers(min_boxes, max_boxes, n)
    feats = [np.maximum(g.standard_normal((c, dim)), 0).astype(np.float32) for c in counts]
    boxes = []
    for c in counts:
        xy = g.uniform(0, 0.5, (c, 2))
        boxes.append(np.concatenate([xy, xy + g.uniform(0.05, 0.5, (c, 2))], 1).astype(np.float32))
    return feats, boxes


def assert_same_bits(actual: ImageFeatures | dict, expected: ImageFeatures) -> None:
    """Same img_id and sizes, and every array with the same dtype, shape and bytes (`actual` may be a dict row)."""
    get = actual.get if isinstance(actual, dict) else lambda name: getattr(actual, name)
    assert get("img_id") == expected.img_id
    assert (get("img_h"), get("img_w")) == (expected.img_h, expected.img_w)
    for name in ARRAY_FIELDS:
        value, reference = get(name), getattr(expected, name)
        assert value.dtype == reference.dtype and value.shape == reference.shape, name
        assert value.tobytes() == reference.tobytes(), name


def raw_tsv_line(record: ImageFeatures) -> str:
    """The TSV line of `record` built without the library's encoder, which refuses invalid records: for writing
    the rows another tool might write (boxes outside the image ...)."""
    def b64(array: np.ndarray, dtype: str) -> str:
        return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")

    fields = [
        record.img_id, str(record.img_h), str(record.img_w), b64(record.objects_id, "<i8"),
        b64(record.objects_conf, "<f4"), b64(record.attrs_id, "<i8"), b64(record.attrs_conf, "<f4"),
        str(record.num_boxes), b64(record.boxes, "<f4"), b64(record.features, "<f4"),
    ]  # fmt: skip
    return "\t".join(fields) + "\n"


def tsv_lines(path: Path) -> list[str]:
    """The lines of a text file, terminators kept."""
    return path.read_text().splitlines(keepends=True)


@contextmanager
def lock_held_by_another_process(path: Path) -> Iterator[subprocess.Popen]:
    """Another process holding the writer's lock of `path` (`<path>.lock`, fcntl.flock), as a running extract.py
    does; the process is SIGKILLed on exit (the OS then drops its lock)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(path) + ".lock"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()


_HOLD_LOCK = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)
