"""Boxes the detector itself proposes must pass the original reader's check (normalised boxes within [0, 1 + 1e-5]).

Proposals are clipped to the resized image (original size x scale, rounded); dividing by the scale could overshoot the
original border. A random tiny detector proposes boxes everywhere, borders included, so it exercises the clip on many
odd image sizes (both resize rules: shorter side to min_size, and the max_size cap).
"""

from __future__ import annotations

import numpy as np
import pytest

from lxmert_pl.detector import OBJ36, load_detector, save_tiny_detector
from lxmert_pl.detector.selection import BoxSelection

ODD_SIZES = [(157, 166), (166, 157), (97, 301), (301, 97), (33, 47), (600, 1001), (1, 3), (511, 513), (77, 1234)]


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory, one_torch_thread):
    directory = save_tiny_detector(tmp_path_factory.mktemp("det"), seed=3)
    detector, _ = load_detector(directory)
    return detector


@pytest.mark.parametrize("height,width", ODD_SIZES)
def test_detected_boxes_stay_inside_the_image(tiny_detector, height, width):
    rng = np.random.default_rng(height * 10_000 + width)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    for selection in (OBJ36, BoxSelection(10, 100)):
        row = tiny_detector.extract([image], img_ids=["x"], selection=selection)[0]
        assert row.num_boxes > 0
        normalised = row.normalized_boxes()  # the reader's check (raises when a box leaves [0, 1 + 1e-5])
        assert normalised.min() >= 0.0 and normalised.max() <= 1.0
        assert np.all(row.boxes[:, 2] >= row.boxes[:, 0]) and np.all(row.boxes[:, 3] >= row.boxes[:, 1])
