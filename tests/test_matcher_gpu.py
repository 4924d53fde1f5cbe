"""The matcher's CUDA paths (bench/gpu_check.sh runs this): golden parity on CUDA with the fused QKV projection and
SDPA's kernels, a padded batch equal to each pair alone, and `model.compile` (torch.compile + CUDA graphs) equal
to eager. Skipped without CUDA."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lxmert_pl.model import load_lxmert
from lxmert_pl.model import lxrt
from lxmert_pl.model.compile import compile_layers
from lxmert_pl.scoring import forward_pairs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
ATOL = 1e-5


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 matmuls in IEEE precision (TF32 would be far outside 1e-5)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _inputs(d, suffix: str = "") -> dict:
    return {"input_ids": torch.tensor(d["input_ids" + suffix]).cuda(),
            "attention_mask": torch.tensor(d["input_mask" + suffix]).cuda(),
            "token_type_ids": torch.tensor(d["segment_ids" + suffix]).cuda(),
            "features": torch.tensor(d["feats" + suffix]).cuda(), "boxes": torch.tensor(d["boxes" + suffix]).cuda(),
            "box_mask": None}


def test_golden_parity_on_cuda_with_the_fast_paths(lxrt_golden):
    model, _ = load_lxmert(lxrt_golden / "tiny_LXRT_strong.pth", model_config=lxrt_golden / "tiny_config.json")
    model = model.eval().cuda()
    d = np.load(lxrt_golden / "tiny_io_strong.npz", allow_pickle=False)
    batch = _inputs(d)
    assert lxrt.use_fused_qkv(batch["features"])
    with torch.no_grad():
        out = forward_pairs(model, batch, scores=("itm", "cosine"))
        full = model(batch["input_ids"], batch["attention_mask"], batch["features"], batch["boxes"], None,
                     batch["token_type_ids"])
    for got, key in ((out.match_logits, "cross_relationship_score"), (out.cosine, "cos_max_score"),
                     (out.pooled_output, "pooled_output"), (full.lang_output, "lang_output"),
                     (full.visn_output, "visn_output")):
        diff = float((got.float().cpu() - torch.from_numpy(d[key])).abs().max())
        assert diff <= ATOL, f"{key}: {diff:.3g}"


def test_compile_with_cuda_graphs_equals_eager(lxrt_golden):
    model, _ = load_lxmert(lxrt_golden / "tiny_LXRT_strong.pth", model_config=lxrt_golden / "tiny_config.json")
    model = model.eval().cuda()
    d = np.load(lxrt_golden / "tiny_io_varboxes_strong.npz", allow_pickle=False)
    compiled = compile_layers(copy.deepcopy(model), True)
    for suffix in ("_0", "_1", "_0"):  # two shapes, then the first again (its recorded graph)
        batch = _inputs(d, suffix)
        with torch.no_grad():
            want = forward_pairs(model, batch, scores=("itm", "cosine"))
            got = forward_pairs(compiled, batch, scores=("itm", "cosine"))
            got_logits, got_cosine = got.match_logits.clone(), got.cosine.clone()
        assert float((got_logits - want.match_logits).abs().max()) <= ATOL
        assert float((got_cosine - want.cosine).abs().max()) <= ATOL
