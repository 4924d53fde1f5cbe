"""Build a sentence–image matching pair set from captions: every caption is a positive, plus K negatives.

A negative keeps the positive's caption and pairs it with *another image*: the seed's "image similarity" negatives
are images similar to the true one, so the sentence has to tell the true image from a near miss. How the wrong
image is chosen (`method`):

* ``random``: uniformly among the other valid images;
* ``similar``: among the ``pool`` images nearest to the true one by cosine of mean-pooled box features (hard
  negatives), uniformly at random, so that repeated captions do not all get the same image;
* ``cluster``: k-means (k-means++ seeding) on the same vectors; uniformly among the valid images of the true image's
  cluster, falling back to the nearest other clusters (by centroid distance) when that cluster runs out; each such
  negative counts as a fallback.

A caption can be positive for several images (captions are compared after `normalize_caption`); none of those
images is ever its negative, and no (caption, image) negative is made twice. Negative images are drawn from the
images of ``vectors``. Rows come out in groups, each positive followed by its negatives, and the result depends
only on the inputs and ``seed`` (not on the order of ``vectors``). `write_pairs` writes them as a JSON list, one row
a line.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from lxmert_pl.errors import UserInputError
from lxmert_pl.features.record import ImageFeatures
from lxmert_pl.fileio import atomic_writer

METHODS = ("random", "similar", "cluster")
DEFAULT_POOL_FACTOR = 4  # "similar": choose among the 4 * per_positive nearest valid images by default
DEFAULT_KMEANS_ITERS = 50
_SIMILARITY_BATCH = 256  # rows of the image-by-image cosine matrix computed at once


class FeatureLookup(Protocol):
    """Anything that returns an image's detections by img_id (a FeatureSource, a dict of ImageFeatures)."""

    def get(self, img_id: str) -> ImageFeatures: ...


@dataclass
class BuildStats:
    """What `build_pairs` did, for the summary."""

    positives: int = 0
    negatives: int = 0
    images: int = 0  # images negatives were drawn from (those of `vectors`)
    duplicates: int = 0  # repeated (img_id, caption) positives dropped
    fallbacks: int = 0  # "cluster": negatives drawn outside the true image's cluster
    shortfall: int = 0  # negatives not made because too few valid images were left
    clusters: int = 0  # "cluster": k-means clusters that hold images


def normalize_caption(sent: str) -> str:
    """The form captions are compared in: stripped, lower-cased, runs of whitespace collapsed to one space."""
    return " ".join(sent.lower().split())


def l2_normalize(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); all-zero rows stay zero."""
    matrix = np.asarray(matrix, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return (matrix / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def image_vectors(source: FeatureLookup, img_ids: Iterable[str], progress: bool = False) -> dict[str, np.ndarray]:
    """One unit vector per image: its box features mean-pooled, then L2-normalised (float32 [D]).

    An image without boxes gets the zero vector (cosine 0 to every image).
    """
    img_ids = list(img_ids)
    vectors: dict[str, np.ndarray] = {}
    for img_id in tqdm(img_ids, desc="image vectors", unit="img", disable=not progress):
        features = np.asarray(source.get(img_id).features, dtype=np.float64)
        pooled = features.mean(axis=0) if len(features) else np.zeros(features.shape[-1])
        vectors[img_id] = l2_normalize(pooled)
    return vectors


# --------------------------------------------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------------------------------------------


def _squared_distances(points: np.ndarray, centers: np.ndarray, point_norms: np.ndarray | None = None) -> np.ndarray:
    """[n, k] squared Euclidean distances, clipped at 0 against rounding; `point_norms`: precomputed |points|²."""
    if point_norms is None:
        point_norms = (points**2).sum(1)
    dists = point_norms[:, None] - 2.0 * points @ centers.T + (centers**2).sum(1)[None, :]
    return np.maximum(dists, 0.0)


def _kmeanspp_centers(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: the first center uniformly, each next one with probability ∝ squared distance."""
    norms = (points**2).sum(1)
    chosen = [int(rng.integers(len(points)))]
    nearest = _squared_distances(points, points[chosen], norms)[:, 0]
    for _ in range(1, k):
        cumulative = np.cumsum(nearest, dtype=np.float64)
        if cumulative[-1] > 0:
            pick = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
            pick = min(pick, len(points) - 1)
        else:  # every point coincides with a center: any point will do
            pick = int(rng.integers(len(points)))
        chosen.append(pick)
        nearest = np.minimum(nearest, _squared_distances(points, points[[pick]], norms)[:, 0])
    return points[chosen].copy()


def _updated_centers(points: np.ndarray, labels: np.ndarray, dists: np.ndarray, k: int) -> np.ndarray:
    """Cluster means; an empty cluster is re-seeded with the point farthest from its own center."""
    membership = np.zeros((k, len(points)), dtype=points.dtype)
    membership[labels, np.arange(len(points))] = 1.0
    counts = membership.sum(axis=1)
    centers = (membership @ points) / np.maximum(counts, 1)[:, None]
    own_distance = dists[np.arange(len(points)), labels]
    for cluster in np.flatnonzero(counts == 0):
        farthest = int(np.argmax(own_distance))
        centers[cluster] = points[farthest]
        own_distance[farthest] = -1.0
    return centers


def kmeans(
    vectors: np.ndarray, k: int, seed: int | np.random.SeedSequence, iters: int = DEFAULT_KMEANS_ITERS
) -> np.ndarray:
    """Cluster labels (int64 [n], in 0..k-1) of the rows of `vectors` by Lloyd's k-means with k-means++ seeding.

    Stops early when no label changes. Deterministic for a seed. When rows repeat, fewer than k labels may be used.
    """
    points = np.asarray(vectors, dtype=np.float32)
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"kmeans needs a non-empty [n, d] array, got shape {points.shape}")
    if not 1 <= k <= len(points):
        raise ValueError(f"kmeans: k must lie in 1..{len(points)} (the number of vectors), got {k}")
    if iters < 1:
        raise ValueError(f"kmeans: iters must be at least 1, got {iters}")
    centers = _kmeanspp_centers(points, k, np.random.default_rng(seed))
    norms = (points**2).sum(1)
    labels = np.full(len(points), -1, dtype=np.int64)
    for _ in range(iters):
        dists = _squared_distances(points, centers, norms)
        new_labels = dists.argmin(axis=1).astype(np.int64)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
        centers = _updated_centers(points, labels, dists, k)
    return labels


# --------------------------------------------------------------------------------------------------------------
# Negative samplers: each draws up to k distinct image indices, none of them in `excluded`
# --------------------------------------------------------------------------------------------------------------


def _sample_excluding(rng: np.random.Generator, size: int, excluded: Sequence[int], k: int) -> list[int]:
    """Up to k distinct positions of range(size), uniformly, skipping the sorted distinct positions `excluded`.

    Draws ranks among the allowed positions and maps each rank past the excluded positions below it, so the cost
    does not grow with `size`.
    """
    allowed = size - len(excluded)
    if allowed <= 0 or k <= 0:
        return []
    picks = []
    for rank in rng.choice(allowed, min(k, allowed), replace=False):
        position = int(rank)
        for skipped in excluded:
            if skipped > position:
                break
            position += 1
        picks.append(position)
    return picks


class _RandomSampler:
    """Uniform over all images not excluded."""

    def __init__(self, num_images: int):
        self.num_images = num_images

    def draw(self, rng: np.random.Generator, image: int, excluded: set[int], k: int) -> list[int]:
        return _sample_excluding(rng, self.num_images, sorted(excluded), k)


def _ranked_nearest(similarities: np.ndarray, depth: int) -> np.ndarray:
    """Indices of the `depth` largest similarities, most similar first, ties by index."""
    if depth < len(similarities):
        threshold = np.partition(similarities, len(similarities) - depth)[len(similarities) - depth]
        candidates = np.flatnonzero(similarities >= threshold)
    else:
        candidates = np.arange(len(similarities))
    order = np.lexsort((candidates, -similarities[candidates]))
    return candidates[order][:depth]


class _SimilarSampler:
    """Uniform among the `pool` nearest valid images (cosine of unit vectors).

    Rankings are precomputed for the true images, `depth` deep: enough to leave `pool` candidates after any
    exclusion a caller can make.
    """

    def __init__(self, matrix: np.ndarray, true_images: Iterable[int], pool: int, depth: int):
        self.pool = pool
        self.ranking: dict[int, np.ndarray] = {}
        rows = sorted(set(true_images))
        for start in range(0, len(rows), _SIMILARITY_BATCH):
            batch = rows[start:start + _SIMILARITY_BATCH]
            for row, similarities in zip(batch, matrix[batch] @ matrix.T):
                self.ranking[row] = _ranked_nearest(similarities, depth)

    def draw(self, rng: np.random.Generator, image: int, excluded: set[int], k: int) -> list[int]:
        candidates = [int(j) for j in self.ranking[image] if j not in excluded][: self.pool]
        return [candidates[p] for p in rng.choice(len(candidates), min(k, len(candidates)), replace=False)]


class _ClusterSampler:
    """Uniform among the valid images of the true image's k-means cluster, then of the nearest other clusters."""

    def __init__(self, matrix: np.ndarray, clusters: int, seed: np.random.SeedSequence, iters: int):
        self.labels = kmeans(matrix, clusters, seed, iters)
        used = np.unique(self.labels)
        self.members = {int(c): np.flatnonzero(self.labels == c) for c in used}
        centroids = np.stack([matrix[self.members[int(c)]].mean(axis=0) for c in used]).astype(np.float64)
        distances = _squared_distances(centroids, centroids)
        self.visit_order: dict[int, list[int]] = {}
        for position, cluster in enumerate(used):
            others = [o for o in np.lexsort((used, distances[position])) if o != position]
            self.visit_order[int(cluster)] = [int(cluster)] + [int(used[o]) for o in others]
        self.fallbacks = 0

    def draw(self, rng: np.random.Generator, image: int, excluded: set[int], k: int) -> list[int]:
        picks: list[int] = []
        for rank, cluster in enumerate(self.visit_order[int(self.labels[image])]):
            members = self.members[cluster]
            inside = sorted(int(np.searchsorted(members, j)) for j in excluded if self.labels[j] == cluster)
            chosen = [int(members[p]) for p in _sample_excluding(rng, len(members), inside, k - len(picks))]
            picks.extend(chosen)
            if rank > 0:
                self.fallbacks += len(chosen)
            if len(picks) == k:
                break
        return picks


# --------------------------------------------------------------------------------------------------------------
# Pair set
# --------------------------------------------------------------------------------------------------------------


def _check_arguments(method: str, per_positive: int, seed: int, pool: int | None) -> None:
    if method not in METHODS:
        raise UserInputError(f"unknown negative method {method!r}; valid: {', '.join(METHODS)}")
    if per_positive < 1:
        raise UserInputError(f"per_positive must be at least 1, got {per_positive}")
    if seed < 0:
        raise UserInputError(f"seed must be a non-negative integer, got {seed}")
    if pool is not None and pool < per_positive:
        raise UserInputError(f"pool ({pool}) must be at least per_positive ({per_positive})")


def _unique_positives(
    positives: Sequence[tuple[str, str]], index: dict[str, int]
) -> tuple[list[tuple[int, str, str]], int]:
    """(image index, caption, normalised caption) per distinct positive, in input order; and the duplicates count."""
    missing = sorted({img_id for img_id, _ in positives if img_id not in index})
    if missing:
        raise UserInputError(f"{len(missing)} positive image(s) have no vector, e.g. {', '.join(missing[:5])}")
    seen: set[tuple[int, str]] = set()
    unique = []
    for img_id, sent in positives:
        key = (index[img_id], normalize_caption(sent))
        if key not in seen:
            seen.add(key)
            unique.append((key[0], sent, key[1]))
    return unique, len(positives) - len(unique)


def _make_sampler(
    method: str,
    matrix: np.ndarray,
    positives: list[tuple[int, str, str]],
    positives_of: dict[str, set[int]],
    per_positive: int,
    pool: int | None,
    clusters: int | None,
    kmeans_iters: int,
    seed: np.random.SeedSequence,
) -> _RandomSampler | _SimilarSampler | _ClusterSampler:
    if method == "random":
        return _RandomSampler(len(matrix))
    if method == "similar":
        pool = pool if pool is not None else DEFAULT_POOL_FACTOR * per_positive
        # a caption excludes its true images and the negatives already given to it: at most (K + 1) per true image
        most_excluded = (per_positive + 1) * max(len(images) for images in positives_of.values())
        return _SimilarSampler(matrix, [image for image, _, _ in positives], pool, pool + most_excluded)
    clusters = clusters if clusters is not None else max(1, round(len(matrix) ** 0.5))
    if not 1 <= clusters <= len(matrix):
        raise UserInputError(f"clusters must lie in 1..{len(matrix)} (the number of images), got {clusters}")
    return _ClusterSampler(matrix, clusters, seed, kmeans_iters)


def _pair_row(question_id: int, img_id: str, sent: str, matched: bool, method: str, negative_of: int | None) -> dict:
    row = {
        "question_id": question_id,
        "img_id": img_id,
        "sent": sent,
        "ground": "True" if matched else "False",
        "label": {"yes": 1} if matched else {"no": 1},
    }
    if negative_of is not None:
        row["negative_of"] = negative_of
    row["negatives"] = method
    return row


def build_pairs(
    positives: Sequence[tuple[str, str]],
    vectors: dict[str, np.ndarray],
    method: str,
    per_positive: int,
    seed: int,
    pool: int | None = None,
    clusters: int | None = None,
    kmeans_iters: int = DEFAULT_KMEANS_ITERS,
    stats: BuildStats | None = None,
) -> list[dict]:
    """Pair rows in the seed's matching format: each distinct positive (img_id, caption), then its negatives.

    Args:
        positives: (img_id, caption) pairs; repeats (same image, same normalised caption) are dropped.
        vectors: img_id -> image vector (see `image_vectors`; L2-normalised again here); negatives are drawn from
            these images, and every positive's image must be among them.
        method: "random", "similar" or "cluster" (see the module docstring).
        per_positive: K, negatives per positive (fewer, counted in `stats.shortfall`, when too few images qualify).
        seed: the only source of randomness: same inputs and seed, same rows.
        pool: "similar": how many nearest valid images to choose among (default 4 * K).
        clusters: "cluster": k of k-means (default round(sqrt(number of images))).
        kmeans_iters: "cluster": at most this many Lloyd iterations.
        stats: when given, filled with counts (see `BuildStats`).

    Returns:
        Rows `{"question_id", "img_id", "sent", "ground", "label", ["negative_of"], "negatives"}`, question_id
        numbering rows from 0; a negative's `negative_of` is its positive's question_id.
    """
    _check_arguments(method, per_positive, seed, pool)
    if not positives:
        raise UserInputError("no positives to build pairs from")
    images = sorted(vectors)
    index = {img_id: position for position, img_id in enumerate(images)}
    matrix = l2_normalize(np.stack([np.asarray(vectors[img_id]) for img_id in images]))
    unique, duplicates = _unique_positives(positives, index)
    positives_of: dict[str, set[int]] = defaultdict(set)
    for image, _, key in unique:
        positives_of[key].add(image)
    kmeans_seed, draw_seed = np.random.SeedSequence(seed).spawn(2)
    sampler = _make_sampler(method, matrix, unique, positives_of, per_positive, pool, clusters, kmeans_iters,
                            kmeans_seed)
    rng = np.random.default_rng(draw_seed)
    used: dict[str, set[int]] = defaultdict(set)
    rows: list[dict] = []
    for image, sent, key in unique:
        negatives = sampler.draw(rng, image, positives_of[key] | used[key], per_positive)
        used[key].update(negatives)
        positive_id = len(rows)
        rows.append(_pair_row(positive_id, images[image], sent, True, method, None))
        rows.extend(_pair_row(len(rows), images[j], sent, False, method, positive_id) for j in negatives)
    if stats is not None:
        _fill_stats(stats, len(unique), len(rows) - len(unique), per_positive, len(images), duplicates, sampler)
    return rows


def _fill_stats(
    stats: BuildStats,
    positives: int,
    negatives: int,
    per_positive: int,
    images: int,
    duplicates: int,
    sampler: _RandomSampler | _SimilarSampler | _ClusterSampler,
) -> None:
    stats.positives, stats.negatives, stats.images, stats.duplicates = positives, negatives, images, duplicates
    stats.shortfall = positives * per_positive - negatives
    if isinstance(sampler, _ClusterSampler):
        stats.fallbacks = sampler.fallbacks
        stats.clusters = len(sampler.members)


def write_pairs(path: str | Path, rows: Iterable[dict]) -> None:
    """Write rows as a JSON list, one row per line, atomically (a temporary file beside `path`, then a rename)."""
    with atomic_writer(path) as handle:
        handle.write("[")
        for position, row in enumerate(rows):
            handle.write(("\n" if position == 0 else ",\n") + json.dumps(row, ensure_ascii=False))
        handle.write("\n]\n")
