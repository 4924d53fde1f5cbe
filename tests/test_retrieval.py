"""Retriever: factorized grid / pair-set scoring, two-stage retrieval, rank metrics, and bf16 scoring (tiny seeded
models)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers_features import random_images

from lxmert_pl.errors import UserInputError
from lxmert_pl.model import LxmertMatchingModel, LxrtConfig, get_preset
from lxmert_pl.metrics import best_relevant_rank, grid_retrieval_metrics, retrieval_metrics
from lxmert_pl.retrieval import Retriever, cross_outputs, encode_set, relevance_matrix
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
    grid = Retriever(model, tokenizer, batch_size=4, mode=mode, image_block=2, caption_block=3).grid(CAPTIONS, feats,
                                                                                                     boxes)
    ref = _pairwise_grid(model, CAPTIONS, feats, boxes, mode)
    assert grid.shape == (5, len(CAPTIONS)) and grid.dtype == torch.float32
    assert float((grid - ref).abs().max()) <= 1e-5
    # scores vary along both axes by far more than the tolerance: a mixed-up pairing would fail
    assert float(ref.std(dim=0).min()) > 1e-3 and float(ref.std(dim=1).min()) > 1e-3
    unfactorized = Retriever(model, tokenizer, batch_size=4, mode=mode, factorize=False).grid(CAPTIONS, feats, boxes)
    assert float((unfactorized - ref).abs().max()) <= 1e-5


def test_pair_set_equals_grid_entries(model, tokenizer):
    feats, boxes = random_images(4, seed=2)
    image_index, caption_index = [3, 0, 0, 2, 3, 1], [6, 0, 5, 5, 6, 2]  # repeats on purpose
    retriever = Retriever(model, tokenizer, batch_size=4)
    got = retriever.pairs(CAPTIONS, feats, boxes, image_index, caption_index)
    grid = retriever.grid(CAPTIONS, feats, boxes)
    assert float((got - grid[image_index, caption_index]).abs().max()) <= 1e-5


def test_each_caption_and_image_is_encoded_once(model, tokenizer):
    feats, boxes = random_images(7, seed=3)
    cache = encode_set(model, tokenizer, CAPTIONS, feats, boxes, batch_size=3)
    assert (cache.images_encoded, cache.captions_encoded) == (7, len(CAPTIONS))
    list(cross_outputs(model, cache, torch.arange(7).repeat(3), torch.arange(21) % len(CAPTIONS), batch_size=5))
    assert (cache.images_encoded, cache.captions_encoded) == (7, len(CAPTIONS))


def _one_caption_each(num_images: int) -> list[int]:
    return list(range(num_images)) + [0] * (len(CAPTIONS) - num_images)


def test_rerank_with_k_covering_everything_is_the_full_grid(model, tokenizer):
    feats, boxes = random_images(6, seed=3)
    retriever = Retriever(model, tokenizer, batch_size=5, image_block=4, caption_block=3)
    full = retriever.evaluate(CAPTIONS, feats, boxes, _one_caption_each(6), k=None)
    covered = retriever.evaluate(CAPTIONS, feats, boxes, _one_caption_each(6), k=len(CAPTIONS))
    # other blocks (image rows vs tiles) pad the boxes of other batches: equal up to float rounding
    assert torch.allclose(covered.i2t_scores, full.i2t_scores, atol=1e-6, rtol=0)
    assert torch.equal(covered.t2i_scores, covered.i2t_scores) and torch.equal(full.t2i_scores, full.i2t_scores)
    assert torch.isfinite(full.i2t_scores).all() and full.first_stage is None
    assert covered.num_pairs_scored == full.num_pairs_scored == 6 * len(CAPTIONS)
    assert covered.metrics == pytest.approx(full.metrics)


def test_small_k_keeps_the_first_stage_top_k(model, tokenizer):
    feats, boxes = random_images(6, seed=4)
    k = 2
    retriever = Retriever(model, tokenizer, batch_size=3, image_block=4)
    result = retriever.evaluate(CAPTIONS, feats, boxes, _one_caption_each(6), k=k)
    first = retriever.first_stage(CAPTIONS, feats, boxes)
    assert torch.equal(result.first_stage, first)
    grid = retriever.grid(CAPTIONS, feats, boxes)
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
        retriever.rerank(CAPTIONS, feats, boxes, k=0)


def test_first_stage_is_cosine_of_cls_and_masked_mean(model, tokenizer):
    feats, boxes = random_images(3, seed=5)
    first = Retriever(model, tokenizer, batch_size=2).first_stage(CAPTIONS[:2], feats, boxes)
    with torch.inference_mode():
        for i in range(3):
            image = model.bert.encode_image(torch.from_numpy(feats[i])[None], torch.from_numpy(boxes[i])[None])
            mean = image.hidden[0].mean(0)  # this image alone: no padded boxes at all
            for j in range(2):
                tokens = tokenizer([CAPTIONS[j]])
                text = model.bert.encode_text(tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"])
                cos = torch.nn.functional.cosine_similarity(mean, text.hidden[0, 0], dim=0)
                assert abs(float(first[i, j] - cos)) <= 1e-5


def _metrics_of(scores, gt, t2i=None):
    relevant = torch.zeros(scores.shape, dtype=torch.bool)
    for image, captions in gt.items():
        relevant[image, list(captions)] = True
    return grid_retrieval_metrics(scores, relevant, t2i)


def test_rank_metrics_on_a_hand_made_matrix():
    inf = float("inf")
    scores = torch.tensor([
        [0.1, 0.9, 0.5, 0.2],  # image 0 (captions 0, 1): best caption 1 first
        [0.8, 0.7, 0.6, 0.5],  # image 1 (caption 2): third
        [-inf, 0.3, 0.3, -inf],  # image 2 (caption 3): pruned, never retrieved
    ])
    got = _metrics_of(scores, {0: {0, 1}, 1: {2}, 2: {3}})
    # t2i: caption 0 -> image 0 second; caption 1 -> image 0 first; caption 2 -> image 1 first; caption 3 pruned
    expected = {"i2t_R@1": 1 / 3, "i2t_R@5": 2 / 3, "i2t_R@10": 2 / 3, "i2t_median_rank": 3.0, "i2t_mean_rank": inf,
                "i2t_queries": 3.0, "t2i_R@1": 0.5, "t2i_R@5": 0.75, "t2i_R@10": 0.75, "t2i_median_rank": 1.0,
                "t2i_mean_rank": inf, "t2i_queries": 4.0}
    expected["RSUM"] = sum(v for name, v in expected.items() if "R@" in name)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value), name


def test_rank_metrics_use_the_t2i_matrix_and_skip_queries_without_ground_truth():
    i2t = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    t2i = torch.tensor([[0.1, 0.9], [0.2, 0.8]])  # caption 0 now ranks image 1 first
    got = _metrics_of(i2t, {0: {0}}, t2i)
    assert got["i2t_queries"] == 1 and got["t2i_queries"] == 1
    assert got["i2t_R@1"] == 1.0 and got["t2i_R@1"] == 0.0 and got["t2i_R@5"] == 1.0
    assert got["t2i_median_rank"] == 2.0 and got["t2i_mean_rank"] == 2.0


def _independent_metrics(scores: np.ndarray, caption_image: list[int]) -> dict[str, float]:
    """R@K, median/mean rank the way VSE++/LAVIS's evaluation loops compute them (numpy, per query)."""
    out = {}
    num_images, num_captions = scores.shape
    ranks = []
    for i in range(num_images):
        order = np.argsort(-scores[i], kind="stable")
        ranks.append(min(np.where(order == j)[0][0] for j in range(num_captions) if caption_image[j] == i))
    t2i_ranks = []
    for j in range(num_captions):
        order = np.argsort(-scores[:, j], kind="stable")
        t2i_ranks.append(np.where(order == caption_image[j])[0][0])
    for name, r in (("i2t", np.array(ranks)), ("t2i", np.array(t2i_ranks))):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = float(np.mean(r < k))
        out[f"{name}_median_rank"] = float(np.floor(np.median(r)) + 1)
        out[f"{name}_mean_rank"] = float(r.mean() + 1)
    out["RSUM"] = sum(v for key, v in out.items() if "R@" in key)
    return out


def test_rank_metrics_equal_an_independent_computation_and_torchmetrics_hit_rate():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(7, 17, generator=g)  # no ties
    caption_image = [j % 7 for j in range(17)]  # 2-3 captions per image
    got = grid_retrieval_metrics(scores, relevance_matrix(caption_image, 7))
    want = _independent_metrics(scores.numpy().astype(np.float64), caption_image)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert 0 < got["i2t_R@1"] < got["i2t_R@5"] <= 1  # fractions, not percent; not a trivial grid
    from torchmetrics.functional.retrieval import retrieval_hit_rate

    relevant = relevance_matrix(caption_image, 7)
    for k in (1, 5, 10):
        hits = [float(retrieval_hit_rate(scores[i], relevant[i], top_k=k)) for i in range(7)]
        assert got[f"i2t_R@{k}"] == pytest.approx(sum(hits) / 7)


def test_grouped_eval_metrics_and_grid_metrics_are_one_definition():
    """eval's grouped metrics (pairs grouped by image / caption) on the pairs of a grid give the grid's metrics: one
    scale (fractions) and one definition of R@K (they were a percent in retrieval.py and a fraction in metrics.py)."""
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(5, 11, generator=g)
    caption_image = [j % 5 for j in range(11)]
    grid = grid_retrieval_metrics(scores, relevance_matrix(caption_image, 5))
    images = [i for i in range(5) for _ in range(11)]
    captions = list(range(11)) * 5
    labels = torch.tensor([int(caption_image[j] == i) for i, j in zip(images, captions)])
    grouped = retrieval_metrics(scores.flatten(), labels, images, "i2t")
    grouped.update(retrieval_metrics(scores.flatten(), labels, captions, "t2i"))
    for name in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_median_rank", "t2i_mean_rank",
                 "i2t_median_rank", "i2t_mean_rank"):
        assert grouped[name] == pytest.approx(grid[name]), name


def test_ties_keep_index_order_and_bad_ground_truth_is_an_error():
    scores = torch.tensor([[0.5, 0.5, 0.1]])
    assert best_relevant_rank(scores, torch.tensor([[False, True, False]])).tolist() == [1.0]
    assert best_relevant_rank(scores, torch.tensor([[True, True, False]])).tolist() == [0.0]
    assert math.isinf(best_relevant_rank(scores, torch.tensor([[False, False, False]]))[0])
    with pytest.raises(ValueError, match="outside"):
        relevance_matrix([3], 1)


def test_itm_without_matching_head_is_an_error(model, tokenizer):
    no_head = LxmertMatchingModel(get_preset("tiny"), heads=())
    no_head.bert.load_state_dict(model.bert.state_dict())
    feats, boxes = random_images(2)
    with pytest.raises(ValueError, match="cosine"):
        Retriever(no_head, tokenizer)
    cosine = Retriever(no_head, tokenizer, mode="cosine").grid(CAPTIONS[:2], feats, boxes)
    assert torch.equal(cosine, Retriever(model, tokenizer, mode="cosine").grid(CAPTIONS[:2], feats, boxes))


@pytest.mark.parametrize("factorize", [True, False])
def test_features_of_another_width_are_a_clear_error(model, tokenizer, factorize):
    feats, boxes = random_images(2)
    narrow = [f[:, :-1] for f in feats]
    retriever = Retriever(model, tokenizer, factorize=factorize)
    with pytest.raises(UserInputError, match=rf"features are {feats[0].shape[1] - 1} wide .* visual_feat_dim="):
        retriever.grid(CAPTIONS[:2], narrow, boxes)


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
    ref = Retriever(model, tokenizer).grid(CAPTIONS, feats, boxes)
    got = Retriever(copy.deepcopy(model), tokenizer, precision="bf16").grid(CAPTIONS, feats, boxes)
    assert got.dtype == torch.float32
    assert float((got - ref).abs().max()) <= 0.02
