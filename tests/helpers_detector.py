"""The tiny golden detector run once per geometry, shared by the parity test modules of both geometries."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from lxmert_pl.detector import ADAPTIVE_10_100, OBJ36, load_detector, read_image

NAMES = ("astronaut", "coffee")
OUTPUTS = {"port": "tiny_outputs.npz", "caffe": "tiny_caffe_outputs.npz"}
# The box selections the golden data holds rows for (img{i}_fixed36_*, img{i}_adaptive_*).
SELECTIONS = {"fixed36": OBJ36, "adaptive": ADAPTIVE_10_100}


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


def check_golden_row(row, data, key: str) -> None:
    """One extracted TSV row against the golden arrays `{key}_*` (ids exact; the golden tolerances for the rest)."""
    np.testing.assert_array_equal(row.objects_id, data[f"{key}_objects_id"])
    np.testing.assert_array_equal(row.attrs_id, data[f"{key}_attrs_id"])
    np.testing.assert_allclose(row.objects_conf, data[f"{key}_objects_conf"], atol=2e-5, rtol=0)
    np.testing.assert_allclose(row.attrs_conf, data[f"{key}_attrs_conf"], atol=2e-5, rtol=0)
    np.testing.assert_allclose(row.boxes, data[f"{key}_boxes"], atol=1e-2, rtol=0)
    np.testing.assert_allclose(row.features, data[f"{key}_features"], atol=1e-4, rtol=0)
