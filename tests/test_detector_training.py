"""The detector is built for inference: frozen parameters, NHWC convs. On the CPU, PyTorch 2.14's oneDNN backward of
some NHWC convolutions writes outside its buffers (the heap corruption that aborted CI inside make_demo's detector
stage), so an NHWC detector refuses to be differentiated there with an error naming the fix, and an NCHW one
(`channels_last=False`, what make_demo trains) trains.

The shapes are the demo detector's (res2 of 4 channels, strided res5) on a 256 x 344 input: res3's first 1x1
stride-2 convolution then sees a 64 x 86 map, a size at which the NHWC backward faulted in isolation.
"""

from __future__ import annotations

import pytest
import torch

from lxmert_pl.detector import load_detector, save_tiny_detector
from lxmert_pl.detector.backbone import ChannelsLastTrainingError

DEMO_LIKE = {"res2_out_channels": 4, "res5_halve": True, "min_size_test": 256, "max_size_test": 448}
BOXES = torch.tensor([[10.0, 10.0, 200.0, 150.0], [0.0, 0.0, 343.0, 255.0], [50.0, 60.0, 70.0, 90.0]])


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    return save_tiny_detector(tmp_path_factory.mktemp("frcnn"), seed=0, **DEMO_LIKE)


def network_input() -> torch.Tensor:
    return torch.randn(1, 3, 256, 344, generator=torch.Generator().manual_seed(0))


def test_a_loaded_detector_is_frozen_and_runs_with_autograd_on(detector_dir):
    model, _ = load_detector(detector_dir)
    assert not any(p.requires_grad for p in model.parameters())
    features = model.backbone(network_input())  # grad mode on, nothing to differentiate: allowed
    crops = model.roi_head.pool(features, BOXES)
    assert model.roi_head(crops).pooled.shape[0] == len(BOXES)


def test_an_nhwc_detector_refuses_to_be_trained_on_the_cpu(detector_dir):
    model, _ = load_detector(detector_dir, fuse_batchnorm=False)
    model.backbone.res3.requires_grad_(True)
    with pytest.raises(ChannelsLastTrainingError, match="channels_last=False"):
        model.backbone(network_input())
    with torch.no_grad():
        features = model.backbone(network_input())  # inference is fine
    model.roi_head.res5.requires_grad_(True)
    crops = model.roi_head.pool(features, BOXES)
    with pytest.raises(ChannelsLastTrainingError, match="channels_last=False"):
        model.roi_head(crops)
    with pytest.raises(ChannelsLastTrainingError):  # a gradient wanted for the input alone is refused too
        model.requires_grad_(False).backbone(network_input().requires_grad_(True))


def test_an_nchw_detector_trains_on_the_cpu(detector_dir):
    model, _ = load_detector(detector_dir, fuse_batchnorm=False, channels_last=False)
    trained = [*model.backbone.parameters(), *model.roi_head.res5.parameters()]
    for p in trained:
        p.requires_grad_(True)
    for _ in range(3):
        crops = model.roi_head.pool(model.backbone(network_input()), BOXES).contiguous()
        model.roi_head.res5(crops).mean(dim=[2, 3]).square().sum().backward()
    conv_grads = [p.grad for p in trained if p.dim() == 4]
    assert conv_grads and all(g is not None and torch.isfinite(g).all() for g in conv_grads)
    assert all(g.abs().sum() > 0 for g in conv_grads)
