"""Factorized grid / pair-set scoring, two-stage retrieval, recalls, and bf16 scoring (tiny seeded models)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from helpers_features import random_images, write_synthetic_tsv

from lxmert_pl.model import LxmertMatchingModel, LxrtConfig, get_preset
from lxmert_pl.model.loading import save_hf_directory
from lxmert_pl.retrieval import (
    best_relevant_rank,
    cross_outputs,
    encode_set,
    first_stage_from_encoded,
    first_stage_scores,
    main,
    retrieval_recalls,
    retrieve,
    score_grid,
    score_pairs,
)
from lxmert_pl.scoring import Scorer
from lxmert_pl.tokenizer import LxmertTokenizer

CAPTIONS = ["a red circle", "a green triangle next to a dog", "two cats", "blue", "a man riding a horse on a beach",
            "an empty room", "three birds on a wire"]


def _strong(config: LxrtConfig, seed: int) -> LxmertMatchingModel:
    """O(1) activations (as in test_hf_parity): matrices N(0, 1/fan_in), every 1-D parameter perturbed."""
    torch.manual_seed(seed)  # the default init that the word embeddings and 1-D parameters start from
    model = LxmertMatchingModel(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "word_embeddings" in name or p.dim() < 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> LxmertMatchingModel:
    return _strong(get_preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def tokenizer() -> LxmertTokenizer:
    return LxmertTokenizer()


def _pairwise_grid(model, sentences, feats, boxes, mode="itm") -> torch.Tensor:
    """Reference: every (image, caption) pair through the whole model (Scorer, no factorization)."""
    pairs = [(i, j) for i in range(len(feats)) for j in range(len(sentences))]
    res = Scorer(model, batch_size=7).score([sentences[j] for _, j in pairs], [feats[i] for i, _ in pairs],
                                            [boxes[i] for i, _ in pairs])
    return torch.from_numpy(res.scores(mode)).view(len(feats), len(sentences))


@pytest.mark.parametrize("mode", ["itm", "cosine"])
def test_grid_equals_pairwise(model, tokenizer, mode):
    feats, boxes = random_images(5, seed=1)
    grid = score_grid(model, tokenizer, CAPTIONS, feats, boxes, batch_size=4, mode=mode)
    ref = _pairwise_grid(model, CAPTIONS, feats, boxes, mode)
    assert grid.shape == (5, len(CAPTIONS)) and grid.dtype == torch.float32
    assert float((grid - ref).abs().max()) <= 1e-5
    # scores vary along both axes by far more than the tolerance: a mixed-up pairing would fail
    assert float(ref.std(dim=0).min()) > 1e-3 and float(ref.std(dim=1).min()) > 1e-3


def test_pair_set_equals_grid_entries(model, tokenizer):
    feats, boxes = random_images(4, seed=2)
    image_index, caption_index = [3, 0, 0, 2, 3, 1], [6, 0, 5, 5, 6, 2]  # repeats on purpose
    got = score_pairs(model, tokenizer, CAPTIONS, feats, boxes, image_index, caption_index, batch_size=4)
    grid = score_grid(model, tokenizer, CAPTIONS, feats, boxes)
    assert float((got - grid[image_index, caption_index]).abs().max()) <= 1e-5


def _gt_one_caption_each(num_images: int) -> dict[int, set[int]]:
    return {i: {i} for i in range(num_images)}


def test_retrieve_with_k_covering_everything_is_the_full_grid(model, tokenizer):
    feats, boxes = random_images(6, seed=3)
    gt = _gt_one_caption_each(6)
    full = retrieve(model, tokenizer, CAPTIONS, feats, boxes, gt, k=None, batch_size=5)
    covered = retrieve(model, tokenizer, CAPTIONS, feats, boxes, gt, k=len(CAPTIONS), batch_size=5)
    assert torch.equal(covered.i2t_scores, full.i2t_scores) and torch.equal(covered.t2i_scores, full.i2t_scores)
    assert torch.isfinite(full.i2t_scores).all() and full.first_stage is None
    assert covered.num_pairs_scored == full.num_pairs_scored == 6 * len(CAPTIONS)
    assert covered.metrics == full.metrics == retrieval_recalls(full.i2t_scores, gt)


def test_small_k_keeps_the_first_stage_top_k(model, tokenizer):
    feats, boxes = random_images(6, seed=4)
    k = 2
    result = retrieve(model, tokenizer, CAPTIONS, feats, boxes, _gt_one_caption_each(6), k=k, batch_size=3)
    first = first_stage_scores(model, tokenizer, CAPTIONS, feats, boxes)
    assert torch.equal(result.first_stage, first)
    grid = score_grid(model, tokenizer, CAPTIONS, feats, boxes)
    kept_i2t, kept_t2i = torch.isfinite(result.i2t_scores), torch.isfinite(result.t2i_scores)
    for i in range(6):
        assert set(kept_i2t[i].nonzero().flatten().tolist()) == set(first[i].topk(k).indices.tolist())
    for j in range(len(CAPTIONS)):
        assert set(kept_t2i[:, j].nonzero().flatten().tolist()) == set(first[:, j].topk(k).indices.tolist())
    # re-ranked candidates carry the matching head's score; the others are pruned to -inf
    assert float((result.i2t_scores[kept_i2t] - grid[kept_i2t]).abs().max()) <= 1e-5
    assert float((result.t2i_scores[kept_t2i] - grid[kept_t2i]).abs().max()) <= 1e-5
    assert result.num_pairs_scored == int((kept_i2t | kept_t2i).sum()) < grid.numel()
    with pytest.raises(ValueError, match="k must"):
        retrieve(model, tokenizer, CAPTIONS, feats, boxes, _gt_one_caption_each(6), k=0)


def test_first_stage_is_cosine_of_cls_and_masked_mean(model, tokenizer):
    feats, boxes = random_images(3, seed=5)
    with torch.inference_mode():
        encoded = encode_set(model, tokenizer, CAPTIONS[:2], feats, boxes)
        first = first_stage_from_encoded(encoded)
        for i in range(3):
            n = len(boxes[i])
            mean = encoded.image.hidden[i, :n].mean(0)  # the padded boxes must not count
            for j in range(2):
                cos = torch.nn.functional.cosine_similarity(mean, encoded.text.hidden[j, 0], dim=0)
                assert abs(float(first[i, j] - cos)) <= 1e-5


def test_recalls_on_a_hand_made_matrix():
    inf = float("inf")
    scores = torch.tensor([
        [0.1, 0.9, 0.5, 0.2],  # image 0 (captions 0, 1): best caption 1 first
        [0.8, 0.7, 0.6, 0.5],  # image 1 (caption 2): third
        [-inf, 0.3, 0.3, -inf],  # image 2 (caption 3): pruned, never retrieved
    ])
    gt = {0: {0, 1}, 1: {2}, 2: {3}}
    got = retrieval_recalls(scores, gt)
    # t2i: caption 0 -> image 0 second; caption 1 -> image 0 first; caption 2 -> image 1 first; caption 3 pruned
    expected = {"i2t_R@1": 100 / 3, "i2t_R@5": 200 / 3, "i2t_R@10": 200 / 3, "i2t_queries": 3.0,
                "t2i_R@1": 50.0, "t2i_R@5": 75.0, "t2i_R@10": 75.0, "t2i_queries": 4.0}
    expected["RSUM"] = sum(v for name, v in expected.items() if "R@" in name)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), name


def test_recalls_use_the_t2i_matrix_and_skip_queries_without_ground_truth():
    i2t = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    t2i = torch.tensor([[0.1, 0.9], [0.2, 0.8]])  # caption 0 now ranks image 1 first
    got = retrieval_recalls(i2t, {0: {0}}, t2i)
    assert got["i2t_queries"] == 1 and got["t2i_queries"] == 1
    assert got["i2t_R@1"] == 100.0 and got["t2i_R@1"] == 0.0 and got["t2i_R@5"] == 100.0


def test_ties_keep_index_order_and_bad_ground_truth_is_an_error():
    scores = torch.tensor([[0.5, 0.5, 0.1]])
    assert best_relevant_rank(scores, torch.tensor([[False, True, False]])).tolist() == [1.0]
    assert best_relevant_rank(scores, torch.tensor([[True, True, False]])).tolist() == [0.0]
    assert math.isinf(best_relevant_rank(scores, torch.tensor([[False, False, False]]))[0])
    with pytest.raises(ValueError, match="out of range"):
        retrieval_recalls(scores, {0: {3}})


def test_itm_without_matching_head_is_an_error(model, tokenizer):
    no_head = LxmertMatchingModel(get_preset("tiny"), heads=())
    no_head.bert.load_state_dict(model.bert.state_dict())
    feats, boxes = random_images(2)
    with pytest.raises(RuntimeError, match="cosine"):
        score_grid(no_head, tokenizer, CAPTIONS[:2], feats, boxes)
    cosine = score_grid(no_head, tokenizer, CAPTIONS[:2], feats, boxes, mode="cosine")
    assert torch.equal(cosine, score_grid(model, tokenizer, CAPTIONS[:2], feats, boxes, mode="cosine"))


def _structured_inputs(num_images: int, num_captions: int, seed: int):
    """Captions from per-caption topic words; images whose boxes share an image code (pairs really differ)."""
    g = np.random.default_rng(seed)
    vocab = list(LxmertTokenizer().vocab)[2000:20000]
    sentences = [" ".join(g.choice(g.choice(vocab, 12), g.integers(3, 16))) for _ in range(num_captions)]
    feats, boxes = [], []
    for _ in range(num_images):
        n = int(g.integers(2, 20))
        feats.append(np.maximum(2 * np.maximum(g.standard_normal(2048), 0) + g.standard_normal((n, 2048)), 0)
                     .astype(np.float32))
        xy = g.uniform(0, 0.5, (n, 2))
        boxes.append(np.concatenate([xy, xy + g.uniform(0.05, 0.5, (n, 2))], 1).astype(np.float32))
    return sentences, feats, boxes


def _calibrate_matching_head(model: LxmertMatchingModel, pooled: torch.Tensor, spread: float = 2.0) -> None:
    """A stand-in for a trained head (as in bench/bf16_speed.py): it reads the top principal direction of the fp32
    pooled outputs, centred on their median, logit-difference std `spread`: probabilities spread over (0, 1)."""
    direction = torch.linalg.svd(pooled - pooled.mean(0), full_matrices=False).Vh[0]
    projection = pooled @ direction
    scale = spread / float(projection.std())
    head = model.cls.seq_relationship
    with torch.no_grad():
        head.weight.zero_()
        head.weight[1] = scale * direction
        head.bias.zero_()
        head.bias[1] = -scale * float(projection.median())


def _grid_pairs(num_images: int, num_captions: int) -> tuple[list[int], list[int]]:
    return [i for i in range(num_images) for _ in range(num_captions)], list(range(num_captions)) * num_images


def test_bf16_scorer_agrees_with_fp32(tokenizer):
    """bf16 vs fp32 on 320 pairs of a small model (the tiny preset at width 128: at width 32 one rounded weight
    weighs too much). bf16 rounds every weight (~0.4%), which moves a random model's logit difference by ~1% of
    its spread: a pair lying closer than that to the boundary may flip. So decisions must agree on >= 99.5% of the
    pairs whose fp32 logit difference is >= 0.1 away from 0 (and on >= 98% of all)."""
    config = get_preset("tiny").replace(hidden_size=128, intermediate_size=256)
    fp32_model = _strong(config, seed=7)
    sentences, feats, boxes = _structured_inputs(20, 16, seed=2)
    images, captions = _grid_pairs(20, 16)
    with torch.inference_mode():  # the head is calibrated on these pairs' fp32 pooled outputs
        encoded = encode_set(fp32_model, tokenizer, sentences, feats, boxes)
        outputs = cross_outputs(fp32_model, encoded, torch.tensor(images), torch.tensor(captions))
        _calibrate_matching_head(fp32_model, torch.cat([out.pooled_output for out in outputs]))
    bf16 = Scorer(copy.deepcopy(fp32_model), batch_size=64, precision="bf16")
    from lxmert_pl.model.lxrt import LayerNorm

    for name, module in bf16.model.named_modules():  # cast once, at construction; LayerNorms stay fp32 by design
        want = torch.float32 if isinstance(module, LayerNorm) else torch.bfloat16
        assert all(p.dtype == want for p in module.parameters(recurse=False)), name
    pairs = ([sentences[j] for j in captions], [feats[i] for i in images], [boxes[i] for i in images])
    ref = Scorer(fp32_model, batch_size=64).score(*pairs)
    got = bf16.score(*pairs)
    assert got.match_prob.dtype == np.float32 and got.cosine.dtype == np.float32
    # probabilities spread out and both decisions occur: agreement is not trivial
    assert ref.match_prob.std() > 0.15 and 0.3 < np.mean(ref.match_prob > 0.5) < 0.7
    assert np.abs(ref.match_prob - got.match_prob).max() <= 0.02
    agree = (ref.match_prob > 0.5) == (got.match_prob > 0.5)
    clear = np.abs(ref.match_logits[:, 1] - ref.match_logits[:, 0]) >= 0.1
    assert agree[clear].mean() >= 0.995 and agree.mean() >= 0.98, (agree[clear].mean(), agree.mean())
    with pytest.raises(ValueError, match="precision"):
        Scorer(fp32_model, precision="fp16")


def test_bf16_grid_matches_fp32_grid(model, tokenizer):
    feats, boxes = random_images(4, seed=9)
    ref = score_grid(model, tokenizer, CAPTIONS, feats, boxes)
    got = score_grid(copy.deepcopy(model), tokenizer, CAPTIONS, feats, boxes, dtype=torch.bfloat16)
    assert got.dtype == torch.float32
    assert float((got - ref).abs().max()) <= 0.02


def test_cli_writes_metrics_equal_to_retrieve(tmp_path, model, tokenizer):
    img_ids = [f"COCO_val2014_{i:012d}" for i in range(4)]
    records = write_synthetic_tsv(tmp_path / "feats.tsv", img_ids, num_boxes=[5, 9, 3, 7], seed=1)
    entries = [{"img_id": img_id, "sentf": {"mscoco": CAPTIONS[2 * n : 2 * n + 2]}}
               for n, img_id in enumerate(img_ids)]
    entries.append({"img_id": "no_captions", "sentf": {"vqa": ["What is it?"]}})
    (tmp_path / "captions.json").write_text(json.dumps(entries), encoding="utf-8")
    save_hf_directory(model, tmp_path / "ckpt")
    metrics = main(["--ckpt", str(tmp_path / "ckpt"), "--captions", str(tmp_path / "captions.json"),
                    "--features", str(tmp_path / "feats.tsv"), "--k", "3", "--out", str(tmp_path / "out")])
    sentences = [c for e in entries[:4] for c in e["sentf"]["mscoco"]]
    gt = {0: {0, 1}, 1: {2, 3}, 2: {4, 5}, 3: {6}}
    ref = retrieve(model, tokenizer, sentences, [r.features for r in records], [r.normalized_boxes() for r in records],
                   gt, k=3)
    assert metrics == pytest.approx(ref.metrics)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert written["metrics"] == pytest.approx(ref.metrics) and written["num_captions"] == 7
    scores = np.load(tmp_path / "out" / "scores.npz")
    np.testing.assert_allclose(scores["i2t"], ref.i2t_scores.numpy(), atol=1e-6)
