"""Pair-set builder: negatives by random image, by image similarity and by k-means cluster; the `build` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lxmert_pl.errors import UserInputError
from conftest import REPO_ROOT
from helpers_features import make_image_features, write_synthetic_tsv

from lxmert_pl.pairs.__main__ import main
from lxmert_pl.pairs.builder import (
    METHODS,
    BuildStats,
    build_pairs,
    image_vectors,
    kmeans,
    l2_normalize,
    normalize_caption,
    write_pairs,
)

GROUPS = 5
PER_GROUP = 12


def _grouped_vectors(seed: int = 0, spread: float = 0.05) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """GROUPS tight, well-separated groups of PER_GROUP unit vectors: img_id -> vector, img_id -> group."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((GROUPS, 16))
    vectors, groups = {}, {}
    for number in range(GROUPS * PER_GROUP):
        img_id = f"img{number:03d}"
        group = number % GROUPS
        vectors[img_id] = l2_normalize(centers[group] + spread * rng.standard_normal(16))
        groups[img_id] = group
    return vectors, groups


def _captions(vectors: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """Two own captions per image, plus one caption shared (up to case and spaces) by img000 and img001."""
    positives = [(img_id, f"caption {n} of {img_id}") for img_id in vectors for n in range(2)]
    return positives + [("img000", "A dog on a  sofa."), ("img001", " a DOG on a sofa. ")]


def _positive_images_by_caption(positives: list[tuple[str, str]]) -> dict[str, set[str]]:
    images: dict[str, set[str]] = {}
    for img_id, sent in positives:
        images.setdefault(normalize_caption(sent), set()).add(img_id)
    return images


def _negatives(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(positive row, negative row) for every negative."""
    by_id = {row["question_id"]: row for row in rows}
    return [(by_id[row["negative_of"]], row) for row in rows if row["ground"] == "False"]


def _mean_negative_cosine(rows: list[dict], vectors: dict[str, np.ndarray]) -> float:
    return float(np.mean([vectors[pos["img_id"]] @ vectors[neg["img_id"]] for pos, neg in _negatives(rows)]))


@pytest.fixture(scope="module")
def grouped() -> tuple[dict[str, np.ndarray], dict[str, int]]:
    return _grouped_vectors()


# --------------------------------------------------------------------------------------------------------------
# Vectors and k-means
# --------------------------------------------------------------------------------------------------------------


def test_normalize_caption_ignores_case_and_spacing():
    assert normalize_caption("  A  Dog\ton the\nSofa. ") == "a dog on the sofa."
    assert normalize_caption("A dog.") != normalize_caption("A dog")


def test_image_vectors_are_mean_pooled_and_unit_length():
    rng = np.random.default_rng(0)
    first = make_image_features("a", 3, 8, rng)
    no_boxes = make_image_features("b", 0, 8, rng)
    vectors = image_vectors({"a": first, "b": no_boxes}, ["a", "b"])
    pooled = first.features.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(vectors["a"], pooled / np.linalg.norm(pooled), rtol=1e-6)
    assert vectors["a"].dtype == np.float32
    np.testing.assert_array_equal(vectors["b"], np.zeros(8, dtype=np.float32))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_separated_groups(grouped, seed):
    vectors, groups = grouped
    labels = kmeans(np.stack(list(vectors.values())), GROUPS, seed)
    truth = np.array(list(groups.values()))
    assert len(set(labels.tolist())) == GROUPS
    assert len(set(zip(labels.tolist(), truth.tolist()))) == GROUPS  # same partition, any label names
    np.testing.assert_array_equal(labels, kmeans(np.stack(list(vectors.values())), GROUPS, seed))


def test_kmeans_labels_are_a_lloyd_fixed_point():
    points = np.random.default_rng(0).standard_normal((200, 4))
    labels = kmeans(points, 5, seed=0, iters=100)
    means = np.stack([points[labels == cluster].mean(axis=0) for cluster in range(5)])
    nearest = ((points[:, None, :] - means[None]) ** 2).sum(-1).argmin(axis=1)
    np.testing.assert_array_equal(labels, nearest)  # converged: each point in the cluster of its nearest mean


def test_kmeans_rejects_bad_k():
    with pytest.raises(ValueError, match="k must lie in 1..3"):
        kmeans(np.eye(3), 4, seed=0)
    with pytest.raises(ValueError, match="k must lie"):
        kmeans(np.eye(3), 0, seed=0)


def test_kmeans_handles_repeated_points():
    labels = kmeans(np.ones((6, 4)), 3, seed=0)
    assert labels.shape == (6,) and len(set(labels.tolist())) == 1


# --------------------------------------------------------------------------------------------------------------
# build_pairs
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_rows_other_seed_other_rows(grouped, method, tmp_path):
    vectors, _ = grouped
    positives = _captions(vectors)
    first = build_pairs(positives, vectors, method, per_positive=2, seed=7)
    shuffled_dict = dict(reversed(list(vectors.items())))  # the order of `vectors` must not matter
    again = build_pairs(positives, shuffled_dict, method, per_positive=2, seed=7)
    other = build_pairs(positives, vectors, method, per_positive=2, seed=8)
    write_pairs(tmp_path / "first.json", first)
    write_pairs(tmp_path / "again.json", again)
    assert (tmp_path / "first.json").read_bytes() == (tmp_path / "again.json").read_bytes()
    assert first != other


@pytest.mark.parametrize("method", METHODS)
def test_rows_in_seed_format_each_positive_then_its_negatives(grouped, method):
    vectors, _ = grouped
    positives = _captions(vectors)
    rows = build_pairs(positives, vectors, method, per_positive=3, seed=0)
    assert [row["question_id"] for row in rows] == list(range(len(rows)))
    assert len(rows) == len(positives) * 4
    for start in range(0, len(rows), 4):
        positive, negatives = rows[start], rows[start + 1:start + 4]
        assert positive == {"question_id": start, "img_id": positive["img_id"], "sent": positive["sent"],
                            "ground": "True", "label": {"yes": 1}, "negatives": method}
        for negative in negatives:
            assert negative["ground"] == "False" and negative["label"] == {"no": 1}
            assert negative["negative_of"] == start and negative["sent"] == positive["sent"]
            assert negative["negatives"] == method
    assert [(row["img_id"], row["sent"]) for row in rows[::4]] == positives


@pytest.mark.parametrize("method", METHODS)
def test_negatives_never_match_their_caption(grouped, method):
    vectors, _ = grouped
    positives = _captions(vectors)
    matching = _positive_images_by_caption(positives)
    rows = build_pairs(positives, vectors, method, per_positive=4, seed=3)
    pairs = _negatives(rows)
    assert len(pairs) == 4 * len(positives)
    for _, negative in pairs:
        assert negative["img_id"] not in matching[normalize_caption(negative["sent"])]
    made = [(normalize_caption(neg["sent"]), neg["img_id"]) for _, neg in pairs]
    assert len(made) == len(set(made))  # the shared caption's two positives get distinct negatives


@pytest.mark.parametrize("method", METHODS)
def test_caption_matching_almost_every_image_leaves_only_the_rest(method):
    vectors, _ = _grouped_vectors()
    spellings = ["The same photo", " the  same PHOTO", "the same photo"]
    shared = [(img_id, spellings[n % 3]) for n, img_id in enumerate(list(vectors)[:-2])]
    stats = BuildStats()
    rows = build_pairs(shared, vectors, method, per_positive=1, seed=0, stats=stats)
    negatives = {neg["img_id"] for _, neg in _negatives(rows)}
    assert negatives == set(list(vectors)[-2:])  # only two images do not match: each used once
    assert stats.negatives == 2 and stats.shortfall == len(shared) - 2


def test_similar_negatives_are_nearer_than_random_ones(grouped):
    vectors, _ = grouped
    positives = _captions(vectors)
    similar = _mean_negative_cosine(build_pairs(positives, vectors, "similar", per_positive=2, seed=0), vectors)
    random = _mean_negative_cosine(build_pairs(positives, vectors, "random", per_positive=2, seed=0), vectors)
    assert similar > random + 0.5, (similar, random)


def test_similar_with_pool_k_takes_exactly_the_nearest_valid_images(grouped):
    vectors, _ = grouped
    positives = _captions(vectors)
    matching = _positive_images_by_caption(positives)
    rows = build_pairs(positives, vectors, "similar", per_positive=2, seed=0, pool=2)
    chosen: dict[int, set[str]] = {}
    for positive, negative in _negatives(rows):
        chosen.setdefault(positive["question_id"], set()).add(negative["img_id"])
    given: dict[str, set[str]] = {}
    for positive in rows:
        if positive["ground"] == "True":
            key = normalize_caption(positive["sent"])
            excluded = matching[key] | given.get(key, set())
            others = sorted((img for img in vectors if img not in excluded),
                            key=lambda img: -float(vectors[positive["img_id"]] @ vectors[img]))
            assert chosen[positive["question_id"]] == set(others[:2])
            given.setdefault(key, set()).update(chosen[positive["question_id"]])


def test_cluster_negatives_share_the_cluster(grouped):
    vectors, groups = grouped
    positives = _captions(vectors)
    stats = BuildStats()
    rows = build_pairs(positives, vectors, "cluster", per_positive=3, seed=0, clusters=GROUPS, stats=stats)
    for positive, negative in _negatives(rows):
        assert groups[negative["img_id"]] == groups[positive["img_id"]]
    assert stats.clusters == GROUPS and stats.fallbacks == 0


def test_cluster_without_valid_image_falls_back_to_the_nearest_cluster(grouped):
    vectors, groups = grouped
    center = np.mean([vectors[img] for img in vectors if groups[img] == 0], axis=0)
    lonely = l2_normalize(center + 1.2 * np.random.default_rng(1).standard_normal(16) / 4)
    with_lonely = {**vectors, "lonely": lonely}
    assert max(lonely @ vectors[img] for img in vectors) < 0.9  # far from every other image
    stats = BuildStats()
    rows = build_pairs([("lonely", "an odd one")], with_lonely, "cluster", per_positive=2, seed=0,
                       clusters=GROUPS + 1, stats=stats)
    assert [groups[neg["img_id"]] for _, neg in _negatives(rows)] == [0, 0]
    assert stats.fallbacks == 2 and stats.shortfall == 0


def test_repeated_positives_are_dropped_and_counted(grouped):
    vectors, _ = grouped
    stats = BuildStats()
    rows = build_pairs([("img000", "A cat"), ("img000", "a  cat "), ("img001", "a cat")], vectors, "random",
                       per_positive=1, seed=0, stats=stats)
    assert [(row["img_id"], row["sent"]) for row in rows if row["ground"] == "True"] == [
        ("img000", "A cat"), ("img001", "a cat")]
    assert stats.duplicates == 1 and stats.positives == 2 and stats.negatives == 2
    assert stats.images == len(vectors)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"method": "hardest"}, "unknown negative method"),
        ({"per_positive": 0}, "per_positive must be at least 1"),
        ({"pool": 1, "per_positive": 2}, r"pool \(1\) must be at least per_positive \(2\)"),
        ({"method": "cluster", "clusters": 61}, "clusters must lie in 1..60"),
        ({"seed": -1}, "non-negative"),
    ],
)
def test_bad_arguments_are_refused(grouped, arguments, message):
    vectors, _ = grouped
    call = {"method": "similar", "per_positive": 1, "seed": 0, **arguments}
    with pytest.raises(ValueError, match=message):
        build_pairs([("img000", "a cat")], vectors, **call)


def test_positive_without_vector_is_refused(grouped):
    vectors, _ = grouped
    with pytest.raises(UserInputError, match="1 positive image"):
        build_pairs([("nowhere", "a cat")], vectors, "random", per_positive=1, seed=0)


def test_write_pairs_replaces_atomically(tmp_path):
    out = tmp_path / "pairs.json"
    write_pairs(out, [{"question_id": 0, "sent": "café"}])
    assert json.loads(out.read_text(encoding="utf-8")) == [{"question_id": 0, "sent": "café"}]
    with pytest.raises(TypeError):
        write_pairs(out, [{"question_id": 1}, {"bad": object()}])
    assert json.loads(out.read_text(encoding="utf-8")) == [{"question_id": 0, "sent": "café"}]
    assert [path.name for path in tmp_path.iterdir()] == ["pairs.json"]


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

IMAGES = [f"COCO_val2014_{n:012d}" for n in range(10)]


@pytest.fixture
def caption_files(tmp_path) -> tuple[Path, Path, Path]:
    """A feature TSV of IMAGES, a JSONL caption file (one row labelled 0) and an LXMERT caption file."""
    tsv = tmp_path / "features.tsv"
    write_synthetic_tsv(tsv, IMAGES, num_boxes=4, dim=32, seed=0)
    jsonl = tmp_path / "captions.jsonl"
    lines = [{"img_id": img_id, "sent": f"photo {n}"} for n, img_id in enumerate(IMAGES[:6])]
    lines.append({"img_id": IMAGES[0], "sent": "not this one", "label": 0})
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    lxmert = tmp_path / "mscoco_minival.json"
    entries = [{"img_id": img_id, "sentf": {"mscoco": [f"scene {n}", "A shared caption"]}}
               for n, img_id in enumerate(IMAGES[6:])]
    lxmert.write_text(json.dumps(entries), encoding="utf-8")
    return tsv, jsonl, lxmert


def _run_cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "XDG_CACHE_HOME": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "lxmert_pl.pairs", *arguments], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("method", ["similar", "cluster"])
def test_cli_builds_the_same_file_twice(caption_files, tmp_path, method):
    tsv, jsonl, lxmert = caption_files
    outputs = []
    for name in ("a.json", "b.json"):
        done = _run_cli("build", "--captions", str(jsonl), str(lxmert), "--features", str(tsv), "--out", name,
                        "--negatives", method, "--per-positive", "2", "--seed", "5", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    rows = json.loads(outputs[0])
    assert sum(row["ground"] == "True" for row in rows) == 6 + 4 * 2
    # the shared caption matches 4 of the 10 images: its 4 positives share the 6 others, 2 negatives short
    assert sum(row["ground"] == "False" for row in rows) == 2 * (6 + 4 * 2) - 2
    shared = {row["img_id"] for row in rows if row["sent"] == "A shared caption" and row["ground"] == "True"}
    for positive, negative in _negatives(rows):
        assert negative["img_id"] != positive["img_id"]
        assert not (positive["sent"] == "A shared caption" and negative["img_id"] in shared)
    assert "14 positives + 26 negatives" in done.stdout and "1 labelled 0" in done.stdout
    assert "shortfall: 2 negatives" in done.stdout


def _exit_status(main, arguments) -> int:
    """The exit status of a CLI main that returns 0 or exits through `user_errors`."""
    try:
        return main(arguments)
    except SystemExit as done:
        return done.code


def test_cli_refuses_out_equal_to_an_input(caption_files, tmp_path, capsys):
    tsv, jsonl, _ = caption_files
    before = jsonl.read_bytes()
    assert _exit_status(main, ["build", "--captions", str(jsonl), "--features", str(tsv), "--out", str(jsonl)]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert jsonl.read_bytes() == before


def test_cli_names_images_without_features(caption_files, tmp_path, capsys):
    tsv, jsonl, _ = caption_files
    extra = tmp_path / "more.jsonl"
    extra.write_text(jsonl.read_text() + '{"img_id": "COCO_val2014_999", "sent": "lost"}\n', encoding="utf-8")
    out = tmp_path / "pairs.json"
    arguments = ["build", "--captions", str(extra), "--features", str(tsv), "--out", str(out)]
    assert _exit_status(main, arguments) == 2
    assert "1 of 7 caption images are not in the features" in capsys.readouterr().err
    assert not out.exists()
    assert main(arguments + ["--skip-missing"]) == 0
    assert "1 whose image has no features (1 images)" in capsys.readouterr().out
    assert "COCO_val2014_999" not in out.read_text()


def test_cli_refuses_pool_smaller_than_k(caption_files, tmp_path, capsys):
    tsv, jsonl, _ = caption_files
    arguments = ["build", "--captions", str(jsonl), "--features", str(tsv), "--out", str(tmp_path / "p.json"),
                 "--negatives", "similar", "--per-positive", "3", "--pool", "2"]
    assert _exit_status(main, arguments) == 2
    assert "--pool (2) must be at least --per-positive (3)" in capsys.readouterr().err
