"""The tiny golden detector run once per geometry, shared by the parity test modules of both geometries."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from lxmert_pl.detector import load_detector, read_image

NAMES = ("astronaut", "coffee")
OUTPUTS = {"port": "tiny_outputs.npz", "caffe": "tiny_caffe_outputs.npz"}


@functools.lru_cache(maxsize=2)
def run_tiny_golden(directory: Path, geometry: str) -> dict:
    """The tiny golden weights on both golden images, one at a time and as a batch, with the reference outputs of
    that geometry (`tiny_outputs.npz` for port, `tiny_caffe_outputs.npz` for caffe)."""
    model, report = load_detector(
        directory / "tiny_frcnn.safetensors", config=directory / "tiny_config.yaml", geometry=geometry
    )
    images = [read_image(directory / f"{name}.png") for name in NAMES]
    return {
        "model": model,
        "report": report,
        "images": images,
        "data": np.load(directory / OUTPUTS[geometry]),
        "single": [model.detect([image])[0] for image in images],
        "batch": model.detect(images),
    }
