"""Image–text retrieval over N images × M captions with factorized LXMERT scoring.

Only LXRT's cross-modality layers depend on the pairing, so every caption goes through the language layers once
and every image through the object-relationship layers once (`EncodingCache`); the cross layers and heads then run
per (image, caption) pair, `batch_size` pairs at a time.

    from lxmert_pl.retrieval import Retriever
    retriever = Retriever(model, precision="bf16", batch_size=128)
    result = retriever.evaluate(sentences, features, boxes, caption_image, k=128)
    result.metrics   # i2t_R@1/5/10, t2i_R@1/5/10 (fractions), median/mean rank, RSUM (see lxmert_pl.metrics)

Two ways to rank:

* full grid (`k=None`): the matching head scores every image against every caption;
* two stages (`k` given, the LAVIS protocol): a cheap first-stage score (`Retriever.first_stage`, no cross layers)
  keeps the top-k captions per image and the top-k images per caption; only the union of those pairs is re-ranked
  by the matching head, and every pruned candidate scores -inf. When k covers all candidates this is the full grid.

The grid is cut into blocks (`plan_blocks`: image chunk × caption chunk for the full grid, image rows for top-k), so
that a run can be sharded over processes and resumed block by block (`lxmert_pl.runs.retrieval`); the single-process
`Retriever` walks the same blocks, so both give the same scores. The command line is `eval.py --task retrieval`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lxmert_pl.errors import UserInputError
from lxmert_pl.metrics import grid_retrieval_metrics
from lxmert_pl.model.heads import LxmertMatchingModel, MatchingOutput
from lxmert_pl.model.lxrt import EncodedImage, EncodedText, attention_bias
from lxmert_pl.scoring import (SCORE_MODES, check_feature_width, forward_pairs, pad_boxes, precision_dtype,
                               trim_padding)
from lxmert_pl.tokenizer import LxmertTokenizer

DEFAULT_BATCH_SIZE = 64
DEFAULT_IMAGE_BLOCK = 16  # images per block (full grid and top-k)
DEFAULT_CAPTION_BLOCK = 128  # captions per block (full grid)

# Loads the features and normalised boxes of the images with these indices: ([n_i, D] arrays, [n_i, 4] arrays).
ImageLoader = Callable[[Sequence[int]], tuple[Sequence[np.ndarray], Sequence[np.ndarray]]]


class EncodingCache:
    """Single-modality encodings of a retrieval set, each caption and image encoded at most once.

    Captions (from `sentences`) are encoded on first use, `batch_size` at a time; images are added with
    `add_images`. `text(index)` / `image(index)` return row-aligned batches for the cross layers, images padded to
    the largest box count of the batch and masked, captions (stored without their padding) to the longest.
    Memory: (M·L + N·B)·H values for everything encoded so far.
    `captions_encoded` / `images_encoded` count the encoder passes (each item once).
    """

    def __init__(self, model: LxmertMatchingModel, tokenizer: LxmertTokenizer, sentences: Sequence[str],
                 batch_size: int = DEFAULT_BATCH_SIZE):
        self.model = model
        self.tokenizer = tokenizer
        self.sentences = sentences
        self.batch_size = batch_size
        self._text: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # caption -> (hidden [l, H], mask [l]), real
        self._image: dict[int, torch.Tensor] = {}  # image -> hidden [n_i, H] (real boxes only)
        self.captions_encoded = 0
        self.images_encoded = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def add_captions(self, index: Sequence[int]) -> None:
        missing = sorted({int(j) for j in index} - self._text.keys())
        for start in range(0, len(missing), self.batch_size):
            part = missing[start : start + self.batch_size]
            tokens = trim_padding({k: v.to(self.device)
                                   for k, v in self.tokenizer([self.sentences[j] for j in part]).items()})
            text = self.model.bert.encode_text(tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"])
            for row, j in enumerate(part):  # the tokenizer's real tokens come first: keep only those
                length = int(tokens["attention_mask"][row].sum())
                self._text[j] = (text.hidden[row, :length], tokens["attention_mask"][row, :length])
            self.captions_encoded += len(part)

    def add_images(self, index: Sequence[int], features: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> None:
        """Encode the images `index[p]` (features[p], boxes[p]) that are not cached yet."""
        todo = [(int(i), f, b) for i, f, b in zip(index, features, boxes) if int(i) not in self._image]
        for start in range(0, len(todo), self.batch_size):
            part = todo[start : start + self.batch_size]
            feats, box, mask = (t.to(self.device) for t in pad_boxes([f for _, f, _ in part], [b for _, _, b in part]))
            check_feature_width(self.model, feats, f"image #{part[0][0]}")
            image = self.model.bert.encode_image(feats, box, mask)
            for row, (i, f, _) in enumerate(part):
                self._image[i] = image.hidden[row, : len(f)]
            self.images_encoded += len(part)

    def has_image(self, index: int) -> bool:
        return int(index) in self._image

    def text(self, index: torch.Tensor) -> EncodedText:
        self.add_captions(index.tolist())
        rows = [self._text[j] for j in index.tolist()]
        length = max(len(h) for h, _ in rows)
        hidden = torch.stack([F.pad(h, (0, 0, 0, length - len(h))) for h, _ in rows])
        mask = torch.stack([F.pad(m, (0, length - len(m))) for _, m in rows])
        return EncodedText(hidden, attention_bias(mask, hidden.dtype))

    def image(self, index: torch.Tensor) -> EncodedImage:
        rows = [self._image[i] for i in index.tolist()]
        num_boxes = max(len(h) for h in rows)
        hidden = torch.stack([F.pad(h, (0, 0, 0, num_boxes - len(h))) for h in rows])
        mask = torch.zeros(len(rows), num_boxes, dtype=torch.long, device=hidden.device)
        for row, h in enumerate(rows):
            mask[row, : len(h)] = 1
        return EncodedImage(hidden, attention_bias(mask, hidden.dtype), mask)

    def first_stage_vectors(self, images: Sequence[int], captions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit vectors, float32: each image's mean vision state over its real boxes [n, H] and each caption's
        [CLS] language state [m, H]; their dot products are `first_stage` scores."""
        self.add_captions(captions)
        image_vecs = torch.stack([self._image[int(i)].float().mean(0) for i in images]) if len(images) else None
        caption_vecs = torch.stack([self._text[int(j)][0][0].float() for j in captions]) if len(captions) else None
        hidden = self.model.config.hidden_size
        empty = torch.empty(0, hidden, device=self.device)
        return (F.normalize(image_vecs, dim=-1) if image_vecs is not None else empty,
                F.normalize(caption_vecs, dim=-1) if caption_vecs is not None else empty)


def check_mode(model: LxmertMatchingModel, mode: str) -> None:
    if mode not in SCORE_MODES:
        raise UserInputError(f"unknown score mode {mode!r}; valid: {SCORE_MODES}")
    if mode == "itm" and not model.has_matching_head:
        raise UserInputError("this model has no matching head (cls.seq_relationship): use mode 'cosine' (--mode "
                             "cosine) or a pretraining checkpoint")


def check_sets(sentences: Sequence[str], features: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> None:
    if len(features) != len(boxes):
        raise UserInputError(f"got {len(features)} feature arrays but {len(boxes)} box arrays")
    if not len(sentences) or not len(features):
        raise UserInputError(f"retrieval needs at least one caption and one image, got {len(sentences)} and "
                             f"{len(features)}")


def check_k(k: int | None) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise UserInputError(f"k must be an integer >= 1 (or None for the full grid), got {k!r}")


def cross_outputs(
    model: LxmertMatchingModel,
    encoded: EncodingCache,
    image_index: torch.Tensor,
    caption_index: torch.Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
    scores: tuple[str, ...] | None = None,
) -> Iterator[MatchingOutput]:
    """Cross layers + heads for pairs (image_index[p], caption_index[p]), `batch_size` pairs per yielded output;
    `scores`: only what these scores need (see `LxmertMatchingModel.forward`), None: every output."""
    for start in range(0, len(image_index), batch_size):
        images = image_index[start : start + batch_size]
        captions = caption_index[start : start + batch_size]
        yield model.score_cross(encoded.text(captions), encoded.image(images), scores)


def pick_score(out: MatchingOutput, mode: str) -> torch.Tensor:
    """P(matched) ("itm") or the max-box cosine ("cosine"), float32 on the CPU."""
    return (out.match_prob if mode == "itm" else out.cosine).float().cpu()


def cross_scores(
    model: LxmertMatchingModel,
    encoded: EncodingCache,
    image_index: torch.Tensor,
    caption_index: torch.Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mode: str = "itm",
) -> torch.Tensor:
    """Scores [P] (float32, CPU) of pairs (image_index[p], caption_index[p]) from cached encodings."""
    outputs = cross_outputs(model, encoded, image_index, caption_index, batch_size, scores=(mode,))
    scores = [pick_score(out, mode) for out in outputs]
    return torch.cat(scores) if scores else torch.empty(0)


def topk_mask(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Boolean mask of the top-k entries of `scores` along `dim` (all of them when k >= that size)."""
    k = min(k, scores.shape[dim])
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(dim, scores.topk(k, dim=dim).indices, True)


@dataclass(frozen=True)
class Candidates:
    """The first stage's choice: `i2t` [N, M] keeps each image's top-k captions, `t2i` each caption's top-k
    images; the matching head scores their union (`pairs`), once per pair."""

    i2t: torch.Tensor
    t2i: torch.Tensor

    @classmethod
    def from_first_stage(cls, first: torch.Tensor, k: int) -> "Candidates":
        return cls(topk_mask(first, k, dim=1), topk_mask(first, k, dim=0))

    @property
    def pairs(self) -> torch.Tensor:
        return self.i2t | self.t2i


@dataclass(frozen=True)
class GridBlock:
    """A unit of work: the images `images` against the captions `captions` (full grid), or against their first-stage
    candidates (`captions` None, top-k). Blocks partition the pairs to score."""

    index: int
    images: range
    captions: range | None

    def pairs(self, candidates: Candidates | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_index, caption_index) of the block's pairs, row-major."""
        rows = torch.arange(self.images.start, self.images.stop)
        if self.captions is None:
            if candidates is None:
                raise ValueError(f"block {self.index} is a top-k block: it needs the first stage's candidates")
            image, caption = candidates.pairs[rows].nonzero(as_tuple=True)
            return rows[image], caption
        cols = torch.arange(self.captions.start, self.captions.stop)
        return rows.repeat_interleave(len(cols)), cols.repeat(len(rows))


def plan_blocks(num_images: int, num_captions: int, k: int | None, image_block: int = DEFAULT_IMAGE_BLOCK,
                caption_block: int = DEFAULT_CAPTION_BLOCK) -> list[GridBlock]:
    """Row-major blocks: image chunks × caption chunks for the full grid (k None), image chunks for top-k."""
    if image_block < 1 or caption_block < 1:
        raise UserInputError(f"block sizes must be >= 1, got images {image_block}, captions {caption_block}")
    blocks: list[GridBlock] = []
    for i in range(0, num_images, image_block):
        images = range(i, min(i + image_block, num_images))
        if k is not None:
            blocks.append(GridBlock(len(blocks), images, None))
            continue
        for j in range(0, num_captions, caption_block):
            blocks.append(GridBlock(len(blocks), images, range(j, min(j + caption_block, num_captions))))
    return blocks


@dataclass
class BlockScores:
    """The pairs one block scored: image [P], caption [P] (int64) and score [P] (float32) numpy arrays."""

    block: int
    image: np.ndarray
    caption: np.ndarray
    score: np.ndarray


def assemble_scores(parts: Sequence[BlockScores], num_images: int, num_captions: int) -> torch.Tensor:
    """The score matrix [N, M] from block results, -inf where no pair was scored; a pair scored twice is a bug."""
    scores = torch.full((num_images, num_captions), float("-inf"))
    seen = torch.zeros(num_images, num_captions, dtype=torch.int32)
    for part in parts:
        image, caption = torch.from_numpy(part.image).long(), torch.from_numpy(part.caption).long()
        seen.index_put_((image, caption), torch.ones(len(image), dtype=torch.int32), accumulate=True)
        scores[image, caption] = torch.from_numpy(part.score).float()
    if seen.numel() and int(seen.max()) > 1:
        twice = (seen > 1).nonzero()[:5].tolist()
        raise RuntimeError(f"{int((seen > 1).sum())} pairs were scored more than once (e.g. {twice})")
    return scores


@dataclass
class RetrievalResult:
    """Score matrices [num_images, num_captions] and the metrics they give.

    `i2t_scores[i]` ranks the captions for image i, `t2i_scores[:, j]` the images for caption j; both are the same
    full grid without a first stage. Pruned candidates score -inf. `first_stage` is None without a first stage.
    """

    i2t_scores: torch.Tensor
    t2i_scores: torch.Tensor
    first_stage: torch.Tensor | None
    num_pairs_scored: int
    metrics: dict[str, float]


def relevance_matrix(caption_image: Sequence[int], num_images: int) -> torch.Tensor:
    """Boolean [num_images, num_captions]: True where caption j describes image caption_image[j]."""
    index = torch.as_tensor(list(caption_image), dtype=torch.long)
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= num_images):
        raise ValueError(f"caption_image holds image indices outside [0, {num_images})")
    relevant = torch.zeros(num_images, len(index), dtype=torch.bool)
    relevant[index, torch.arange(len(index))] = True
    return relevant


def split_directions(scores: torch.Tensor, candidates: Candidates | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t, t2i) score matrices: each direction keeps its own candidates (the rest -inf)."""
    if candidates is None:
        return scores, scores
    minus_inf = float("-inf")
    return scores.masked_fill(~candidates.i2t, minus_inf), scores.masked_fill(~candidates.t2i, minus_inf)


class Retriever:
    """Scores image × caption sets with one model, in one process (no Lightning needed).

    `precision` ("fp32" | "bf16") casts the model IN PLACE, once, here; None keeps its dtype. `mode`: "itm"
    (P(matched)) or "cosine". `batch_size`: captions/images per encoder pass and pairs per cross pass.
    `factorize=False` runs the whole model per pair (the pairwise baseline; the first stage still encodes once).
    `image_block` / `caption_block`: the blocks of `plan_blocks`.
    """

    def __init__(self, model: LxmertMatchingModel, tokenizer: LxmertTokenizer | None = None, *,
                 device: str | torch.device = "cpu", precision: str | None = None, mode: str = "itm",
                 batch_size: int = DEFAULT_BATCH_SIZE, factorize: bool = True,
                 image_block: int = DEFAULT_IMAGE_BLOCK, caption_block: int = DEFAULT_CAPTION_BLOCK):
        check_mode(model, mode)
        dtype = None if precision is None else precision_dtype(precision)
        self.model = model.eval().to(device=device, dtype=dtype)
        self.tokenizer = tokenizer or LxmertTokenizer()
        self.mode = mode
        self.batch_size = batch_size
        self.factorize = factorize
        self.image_block = image_block
        self.caption_block = caption_block

    @torch.inference_mode()
    def encode(self, sentences: Sequence[str], features: Sequence[np.ndarray],
               boxes: Sequence[np.ndarray]) -> EncodingCache:
        """Every caption and image through its single-modality layers, once."""
        check_sets(sentences, features, boxes)
        return encode_set(self.model, self.tokenizer, sentences, features, boxes, self.batch_size)

    @torch.inference_mode()
    def pairs(self, sentences: Sequence[str], features: Sequence[np.ndarray], boxes: Sequence[np.ndarray],
              image_index: Sequence[int] | torch.Tensor, caption_index: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Scores [P] of the pairs (image_index[p], caption_index[p]); `features`/`boxes`: per-image arrays
        [n_i, D] / [n_i, 4] (normalised)."""
        image_index = torch.as_tensor(image_index, dtype=torch.long)
        caption_index = torch.as_tensor(caption_index, dtype=torch.long)
        if not self.factorize:
            return self._pairwise(sentences, features, boxes, image_index, caption_index)
        return cross_scores(self.model, self.encode(sentences, features, boxes), image_index, caption_index,
                            self.batch_size, self.mode)

    def _pairwise(self, sentences, features, boxes, image_index: torch.Tensor,
                  caption_index: torch.Tensor) -> torch.Tensor:
        """The whole model per pair (no encoding shared between pairs)."""
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(image_index), self.batch_size):
            images = image_index[start : start + self.batch_size].tolist()
            captions = caption_index[start : start + self.batch_size].tolist()
            batch = {k: v.to(device) for k, v in self.tokenizer([sentences[j] for j in captions]).items()}
            feats, box, mask = pad_boxes([features[i] for i in images], [boxes[i] for i in images])
            check_feature_width(self.model, feats, f"image #{images[0]}")
            batch.update(features=feats.to(device), boxes=box.to(device), box_mask=mask.to(device))
            scores.append(pick_score(forward_pairs(self.model, batch, scores=(self.mode,)), self.mode))
        return torch.cat(scores) if scores else torch.empty(0)

    @torch.inference_mode()
    def first_stage(self, sentences: Sequence[str], features: Sequence[np.ndarray],
                    boxes: Sequence[np.ndarray]) -> torch.Tensor:
        """A cheap pairing score [num_images, num_captions] that needs no cross layers.

        Cosine between the language stream's [CLS] state after the language layers and the masked mean of the
        vision stream after the object-relationship layers. LXMERT was never trained to align these two vectors:
        this is a heuristic for pruning candidates before the matching head re-ranks them, not a trained
        similarity — check on a validation set that its top-k keeps the ground truth before trusting a small k.
        """
        return first_stage_matrix(self.encode(sentences, features, boxes), len(features), len(sentences))

    @torch.inference_mode()
    def grid(self, sentences: Sequence[str], features: Sequence[np.ndarray],
             boxes: Sequence[np.ndarray]) -> torch.Tensor:
        """[num_images, num_captions] scores of every image–caption pair."""
        return self.rerank(sentences, features, boxes, k=None).i2t_scores

    @torch.inference_mode()
    def rerank(self, sentences: Sequence[str], features: Sequence[np.ndarray], boxes: Sequence[np.ndarray],
               k: int | None) -> RetrievalResult:
        """Full grid (`k` None) or first stage + top-k re-ranking, block by block (`plan_blocks`); no metrics."""
        check_k(k)
        check_sets(sentences, features, boxes)
        # The pairwise full grid needs no encodings: it runs the whole model per pair (`_pairwise`).
        cache = self.encode(sentences, features, boxes) if self.factorize or k is not None else None
        first = first_stage_matrix(cache, len(features), len(sentences)) if k is not None else None
        candidates = Candidates.from_first_stage(first, k) if first is not None else None
        parts = []
        for block in plan_blocks(len(features), len(sentences), k, self.image_block, self.caption_block):
            image_index, caption_index = block.pairs(candidates)
            if self.factorize:
                score = cross_scores(self.model, cache, image_index, caption_index, self.batch_size, self.mode)
            else:
                score = self._pairwise(sentences, features, boxes, image_index, caption_index)
            parts.append(BlockScores(block.index, image_index.numpy(), caption_index.numpy(), score.numpy()))
        scores = assemble_scores(parts, len(features), len(sentences))
        i2t, t2i = split_directions(scores, candidates)
        return RetrievalResult(i2t, t2i, first, sum(len(p.score) for p in parts), {})

    def evaluate(self, sentences: Sequence[str], features: Sequence[np.ndarray], boxes: Sequence[np.ndarray],
                 caption_image: Sequence[int], k: int | None = None) -> RetrievalResult:
        """`rerank` plus the retrieval metrics; `caption_image[j]`: the index of caption j's image."""
        result = self.rerank(sentences, features, boxes, k)
        relevant = relevance_matrix(caption_image, len(features))
        result.metrics = grid_retrieval_metrics(result.i2t_scores, relevant, result.t2i_scores)
        return result


def first_stage_matrix(cache: EncodingCache, num_images: int, num_captions: int) -> torch.Tensor:
    """First-stage cosines [N, M] (float32, CPU) of every image and caption of a filled cache."""
    image_vecs, caption_vecs = cache.first_stage_vectors(range(num_images), range(num_captions))
    return (image_vecs @ caption_vecs.T).cpu()


def encode_set(model: LxmertMatchingModel, tokenizer: LxmertTokenizer, sentences: Sequence[str],
               features: Sequence[np.ndarray], boxes: Sequence[np.ndarray],
               batch_size: int = DEFAULT_BATCH_SIZE) -> EncodingCache:
    """Every caption and image encoded once, with the model as it is (no cast, no device move)."""
    cache = EncodingCache(model, tokenizer, sentences, batch_size)
    cache.add_images(range(len(features)), features, boxes)
    cache.add_captions(range(len(sentences)))
    return cache


if __name__ == "__main__":  # the old command: say where it went instead of doing nothing
    import sys

    print("python -m lxmert_pl.retrieval: error: this command is now `python eval.py --task retrieval --captions FILE "
          "--features TSV [--k 128]` (see README, 'Speed')", file=sys.stderr)
    sys.exit(2)
