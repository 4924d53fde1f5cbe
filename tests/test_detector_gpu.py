"""The detector on CUDA (skipped without a GPU; `bench/gpu_check.sh` runs these): golden parity on the GPU within the
golden tolerances, GPU vs CPU, batch invariance with images of different sizes, and the bf16 head on tensor cores.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from lxmert_pl.detector import OBJ36, load_detector, read_image
from lxmert_pl.detector.agreement import region_agreement

NAMES = ("astronaut", "coffee")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@functools.lru_cache(maxsize=1)
def _runs(directory: Path) -> dict:
    def load(device: str, precision: str = "fp32"):
        return load_detector(
            directory / "tiny_frcnn.safetensors", config=directory / "tiny_config.yaml", device=device,
            precision=precision,
        )[0]

    images = [read_image(directory / f"{name}.png") for name in NAMES]
    gpu, gpu_bf16, cpu = load("cuda"), load("cuda", "bf16"), load("cpu")
    return {
        "images": images,
        "data": np.load(directory / "tiny_outputs.npz"),
        "gpu_model": gpu,
        "gpu": [gpu.detect([image])[0] for image in images],
        "gpu_batch": gpu.detect(images),
        "gpu_bf16": [gpu_bf16.detect([image])[0] for image in images],
        "cpu": [cpu.detect([image])[0] for image in images],
    }


@pytest.fixture
def runs(frcnn_golden):
    return _runs(frcnn_golden)


def _close(actual: torch.Tensor, expected: np.ndarray, atol: float, rtol: float = 0.0) -> None:
    np.testing.assert_allclose(actual.float().cpu().numpy(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("i", [0, 1])
def test_gpu_network_outputs_meet_the_golden_tolerances(runs, i):
    data, out = runs["data"], runs["gpu"][i]
    assert out.pooled.is_cuda
    _close(out.boxes, data[f"img{i}_proposals"], atol=5e-3)
    _close(out.proposal_logits, data[f"img{i}_proposal_logits"], atol=1e-4, rtol=1e-5)
    _close(out.cls_logits, data[f"img{i}_obj_logits"], atol=1e-4, rtol=1e-5)
    _close(out.pooled, data[f"img{i}_pooled"], atol=1e-4, rtol=1e-5)
    _close(out.cls_prob, data[f"img{i}_cls_prob"], atol=2e-5)
    row = runs["gpu_model"].to_features("x", out, OBJ36)
    np.testing.assert_array_equal(row.objects_id, data[f"img{i}_fixed36_objects_id"])
    np.testing.assert_allclose(row.features, data[f"img{i}_fixed36_features"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("i", [0, 1])
def test_gpu_equals_cpu(runs, i):
    gpu, cpu = runs["gpu"][i], runs["cpu"][i]
    torch.testing.assert_close(gpu.boxes.cpu(), cpu.boxes, atol=5e-3, rtol=0)
    torch.testing.assert_close(gpu.pooled.cpu(), cpu.pooled, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("i", [0, 1])
def test_gpu_batch_of_different_sizes_equals_one_at_a_time(runs, i):
    one, both = runs["gpu"][i], runs["gpu_batch"][i]
    torch.testing.assert_close(both.boxes, one.boxes, atol=1e-4, rtol=0)
    torch.testing.assert_close(both.pooled, one.pooled, atol=1e-4, rtol=0)


@pytest.mark.parametrize("i", [0, 1])
def test_gpu_bf16_head_agreement(runs, i):
    agreement = region_agreement(runs["gpu"][i], runs["gpu_bf16"][i], OBJ36)
    assert agreement.same_proposals
    assert agreement.shared_fraction >= 0.95
    assert agreement.min_cosine >= 0.9999
    assert runs["gpu_bf16"][i].pooled.dtype == torch.float32
