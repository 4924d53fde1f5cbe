"""The matcher's fast paths give the scores of the plain model: padding trimmed, the last cross layer pruned to what
the asked scores read, the cross attention's two directions batched, fused QKV (the CUDA path, forced here on the
CPU), the mixed-dtype bf16 LayerNorm, `model.compile` on/off, and the pairwise retrieval grid without encodings."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lxmert_pl.model import LxmertMatchingModel, get_preset
from lxmert_pl.model import lxrt
from lxmert_pl.model.compile import compile_layers, compile_mode, is_compiled
from lxmert_pl.retrieval import Retriever
from lxmert_pl.scoring import forward_pairs, pad_boxes, trim_padding
from lxmert_pl.tokenizer import LxmertTokenizer

from helpers_features import random_images

ATOL = 1e-5  # fp32
SENTENCES = ["a red circle", "two dogs play in the park near a tree", "a cat", "a blue square on the left"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LxmertMatchingModel(get_preset("tiny"))
    m.init_weights("fan_in")  # O(1) activations: differences would show
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() < 2:
                p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def _batch(n: int = 4) -> dict:
    tokens = LxmertTokenizer()(SENTENCES[:n])
    feats, boxes = random_images(n, min_boxes=3)
    features, box, mask = pad_boxes(feats, boxes)
    return {**tokens, "features": features, "boxes": box, "box_mask": mask}


def _plain(model, batch):
    """The model as the golden data checks it: every output, no trimming."""
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], batch["features"], batch["boxes"],
                     batch["box_mask"], batch["token_type_ids"])


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    diff = float((a.float() - b.float()).abs().max())
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


def test_trim_padding_drops_only_columns_padded_in_every_row():
    batch = _batch()
    trimmed = trim_padding(batch)
    longest = int(batch["attention_mask"].sum(1).max())
    assert batch["input_ids"].shape[1] == 20 and trimmed["input_ids"].shape[1] == longest < 20
    assert trimmed["token_type_ids"].shape[1] == longest
    most = int(batch["box_mask"].sum(1).max())
    assert trimmed["features"].shape[1] == most == batch["features"].shape[1]  # pad_boxes pads to the largest
    padded = dict(batch, features=F.pad(batch["features"], (0, 0, 0, 5)), boxes=F.pad(batch["boxes"], (0, 0, 0, 5)),
                  box_mask=F.pad(batch["box_mask"], (0, 5)))
    assert trim_padding(padded)["box_mask"].shape[1] == most
    assert trim_padding(trimmed)["input_ids"].shape == trimmed["input_ids"].shape  # nothing left to trim


@pytest.mark.parametrize("scores", [None, ("itm",), ("cosine",), ("itm", "cosine")])
def test_padded_batch_equals_each_pair_alone(model, scores):
    """A batch (padded to 20 tokens and the largest box count, then trimmed) = each pair alone, unpadded, through
    the plain model; pruned outputs (`scores`) equal the full model's."""
    batch = _batch()
    with torch.no_grad():
        fast = forward_pairs(model, batch, scores=scores)
    full = _plain(model, batch)
    for i in range(len(SENTENCES)):
        length, boxes = int(batch["attention_mask"][i].sum()), int(batch["box_mask"][i].sum())
        alone = {"input_ids": batch["input_ids"][i : i + 1, :length], "attention_mask": None,
                 "token_type_ids": batch["token_type_ids"][i : i + 1, :length],
                 "features": batch["features"][i : i + 1, :boxes], "boxes": batch["boxes"][i : i + 1, :boxes],
                 "box_mask": None}
        one = _plain(model, alone)
        _close(fast.pooled_output[i], one.pooled_output[0])
        _close(fast.lang_output[i, 0], one.lang_output[0, 0])
        _close(full.pooled_output[i], one.pooled_output[0])
        if scores is None or "itm" in scores:
            _close(fast.match_logits[i], one.match_logits[0])
            _close(fast.match_prob[i], one.match_prob[0])
        if scores is None or "cosine" in scores:
            _close(fast.cosine[i], one.cosine[0])
            _close(fast.visn_output[i, :boxes], one.visn_output[0])
    if scores is not None:
        assert fast.lang_output.shape[1] == 1
        assert (fast.cosine is None) == ("cosine" not in scores) and (fast.visn_output is None) == (fast.cosine is None)


def test_fused_qkv_path_equals_separate_projections(model, monkeypatch):
    """The CUDA path (one stacked Q/K/V matmul, cached) forced on the CPU: same outputs; the cache follows weight
    changes; on the CPU by default the path is off."""
    batch = _batch()
    assert not lxrt.use_fused_qkv(batch["features"])
    assert compile_mode("cuda") == "reduce-overhead" and compile_mode("cpu") is None
    reference = _plain(model, batch)
    monkeypatch.setattr(lxrt, "use_fused_qkv", lambda x: True)
    fused = _plain(model, batch)
    for name in ("lang_output", "visn_output", "pooled_output", "match_logits", "cosine"):
        _close(getattr(fused, name), getattr(reference, name))
    attention = model.bert.encoder.layer[0].attention.self
    assert "_fused_qkv" in attention.__dict__
    with torch.no_grad():
        attention.value.bias.add_(1.0)
        changed = _plain(model, batch)
        monkeypatch.setattr(lxrt, "use_fused_qkv", lambda x: False)
        unfused = _plain(model, batch)
        attention.value.bias.sub_(1.0)
    _close(changed.pooled_output, unfused.pooled_output)
    assert float((changed.pooled_output - reference.pooled_output).abs().max()) > 1e-3


def test_attention_probs_are_what_the_batched_cross_attention_uses(model):
    """The explain hook (`attention_probs`) weights the values exactly as the batched two-way cross attention does."""
    batch = _batch()
    with torch.no_grad():
        text = model.bert.encode_text(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        image = model.bert.encode_image(batch["features"], batch["boxes"], batch["box_mask"])
        block = model.bert.encoder.x_layers[-1].visual_attention
        lang_att, _ = block.both_ways(text.hidden, text.bias, image.hidden, image.bias)
        att = block.att
        probs = att.attention_probs(text.hidden, image.hidden, image.bias)
        values = att._heads(att.value(image.hidden))
        by_hand = block.output(att._merge(probs @ values), text.hidden)
    _close(lang_att, by_hand)
    _close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


def test_bf16_layernorm_without_casts_equals_fp32_computation():
    norm = lxrt.LayerNorm(32, eps=1e-12)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    norm = norm.to(torch.bfloat16)
    assert norm.weight.dtype == torch.float32
    x = (torch.randn(4, 7, 32) * 3 + 1).to(torch.bfloat16)
    with torch.no_grad():
        want = F.layer_norm(x.float(), (32,), norm.weight, norm.bias, 1e-12).to(torch.bfloat16)
        got = norm(x)
    assert got.dtype == torch.bfloat16
    assert float((got.float() - want.float()).abs().max()) <= 2 ** -7 * float(want.float().abs().max())


@pytest.mark.slow
def test_compile_on_and_off_give_the_same_scores(model, monkeypatch):
    """`model.compile` true vs false on the tiny model, fp32: tolerance 1e-5 (inductor reorders float sums). The
    first compiled call compiles two graphs with inductor's C++ backend: ~70 s on the shared 2-core machine with a
    cold inductor cache (load 5), ~26 s warm; in-process compilation (no worker pool) is the faster on 2 cores."""
    import copy

    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)

    small = LxmertMatchingModel(get_preset("tiny").replace(l_layers=1, x_layers=1))  # fewer graphs to compile
    small.load_state_dict(model.state_dict(), strict=False)
    small.eval()
    batch = _batch(3)
    with torch.no_grad():
        eager = forward_pairs(small, batch, scores=("itm", "cosine"))
    compiled = compile_layers(copy.deepcopy(small), enabled=True)
    assert is_compiled(compiled) and not is_compiled(small)
    start = time.perf_counter()
    with torch.no_grad():
        out = forward_pairs(compiled, batch, scores=("itm", "cosine"))
    print(f"first compiled call (compile included): {time.perf_counter() - start:.1f} s")
    _close(out.match_prob, eager.match_prob)
    _close(out.match_logits, eager.match_logits)
    _close(out.cosine, eager.cosine)
    assert compile_layers(small, enabled=False) is small and not is_compiled(small)


def test_pairwise_grid_encodes_nothing_first(model, monkeypatch):
    """Retriever(factorize=False).grid() runs the whole model per pair and never the encoders' cache."""
    feats, boxes = random_images(2, min_boxes=3)
    factorized = Retriever(model, LxmertTokenizer(), batch_size=3).grid(SENTENCES[:3], feats, boxes)

    def no_encoding(*args, **kwargs):
        raise AssertionError("the pairwise grid encoded the set first")

    monkeypatch.setattr(Retriever, "encode", no_encoding)
    pairwise = Retriever(model, LxmertTokenizer(), batch_size=3, factorize=False).grid(SENTENCES[:3], feats, boxes)
    np.testing.assert_allclose(pairwise.numpy(), factorized.numpy(), atol=ATOL)
    with pytest.raises(AssertionError, match="encoded"):  # top-k's first stage still needs the encodings
        Retriever(model, LxmertTokenizer(), factorize=False).rerank(SENTENCES[:3], feats, boxes, k=1)
