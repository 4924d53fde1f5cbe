"""Binary feature store: conversion from TSVs, exactness, atomicity, memory-mapped reading, errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from helpers_features import assert_same_bits, tsv_lines, write_synthetic_tsv

from lxmert_pl.features.__main__ import main as features_cli
from lxmert_pl.features.sources import MergedFeatureSource, open_feature_source
from lxmert_pl.features.store import FeatureStore, convert_tsvs_to_store
from lxmert_pl.features import (
    DuplicateImageIdError,
    FeatureFileError,
    MissingImageError,
    TruncatedTsvError,
    TsvWriter,
)


@pytest.fixture
def two_tsvs(tmp_path: Path):
    first = write_synthetic_tsv(tmp_path / "a.tsv", ["a0", "a1", "a2"], num_boxes=[2, 5, 1], dim=12, seed=1)
    second = write_synthetic_tsv(tmp_path / "b.tsv", ["b0", "b1"], num_boxes=[36, 3], dim=12, seed=2)
    return [tmp_path / "a.tsv", tmp_path / "b.tsv"], first + second


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_convert_is_bit_exact_and_memory_mapped(tmp_path, two_tsvs):
    paths, records = two_tsvs
    store = convert_tsvs_to_store(paths, tmp_path / "store")
    assert store.img_ids == [r.img_id for r in records] and len(store) == 5
    assert store.describe() == f"feature store {tmp_path / 'store'} (5 images, float32)"
    for record in records:
        assert_same_bits(store.get(record.img_id), record)
    reopened = FeatureStore(tmp_path / "store")
    features = np.load(tmp_path / "store" / "features.npy", mmap_mode="r")
    assert features.shape == (sum(r.num_boxes for r in records), 12) and features.dtype == np.float32
    assert isinstance(reopened._mapped_arrays()["features"], np.memmap)
    for decoded, record in zip(reopened.iter_features(), records):
        assert_same_bits(decoded, record)
    assert _leftovers(tmp_path) == []


def test_store_is_picklable_without_its_mappings(tmp_path, two_tsvs):
    paths, records = two_tsvs
    store = convert_tsvs_to_store(paths, tmp_path / "store")
    store.get("a0")
    payload = pickle.dumps(store)
    assert len(payload) < 10_000
    clone = pickle.loads(payload)
    assert clone._arrays is None
    assert_same_bits(clone.get("b0"), records[3])


def test_fp16_store_says_so_and_returns_float32(tmp_path, two_tsvs):
    paths, records = two_tsvs
    store = convert_tsvs_to_store(paths, tmp_path / "half", fp16=True)
    assert "float16, lossy" in store.describe()
    assert np.load(tmp_path / "half" / "features.npy", mmap_mode="r").dtype == np.float16
    assert json.loads((tmp_path / "half" / "meta.json").read_text())["feature_dtype"] == "float16"
    got = store.get("b0")
    assert got.features.dtype == np.float32
    np.testing.assert_allclose(got.features, records[3].features, rtol=1e-3, atol=1e-3)
    assert got.boxes.tobytes() == records[3].boxes.tobytes()


def test_fp16_refuses_features_beyond_its_range(tmp_path):
    records = write_synthetic_tsv(tmp_path / "big.tsv", ["ok", "huge"], num_boxes=2, dim=4, seed=3)
    records[1].features = records[1].features * 1e5
    with TsvWriter(tmp_path / "big.tsv", append=False) as writer:
        for record in records:
            writer.write(record)
    with pytest.raises(FeatureFileError, match=r"big\.tsv:2 \(img_id 'huge'\): features exceed the float16 range"):
        convert_tsvs_to_store([tmp_path / "big.tsv"], tmp_path / "half", fp16=True)
    assert not (tmp_path / "half").exists() and _leftovers(tmp_path) == []
    assert_same_bits(convert_tsvs_to_store([tmp_path / "big.tsv"], tmp_path / "full").get("huge"), records[1])


def test_existing_output_needs_overwrite(tmp_path, two_tsvs):
    paths, _ = two_tsvs
    convert_tsvs_to_store(paths[:1], tmp_path / "store")
    with pytest.raises(FileExistsError, match="store exists; pass overwrite=True"):
        convert_tsvs_to_store(paths, tmp_path / "store")
    assert len(FeatureStore(tmp_path / "store")) == 3
    assert len(convert_tsvs_to_store(paths, tmp_path / "store", overwrite=True)) == 5
    assert _leftovers(tmp_path) == []


def test_bad_row_fails_naming_the_line_and_leaves_nothing(tmp_path, two_tsvs):
    paths, _ = two_tsvs
    lines = tsv_lines(paths[1])
    lines[1] = lines[1].replace("\t3\t", "\t4\t", 1)
    paths[1].write_text("".join(lines))
    with pytest.raises(FeatureFileError, match=rf"{paths[1]}:2 \(img_id 'b1'\): field 'objects_id' holds"):
        convert_tsvs_to_store(paths, tmp_path / "store")
    assert not (tmp_path / "store").exists() and _leftovers(tmp_path) == []


def test_duplicates_and_truncation_fail_before_writing(tmp_path, two_tsvs):
    paths, _ = two_tsvs
    write_synthetic_tsv(tmp_path / "c.tsv", ["c0", "a1"], num_boxes=1, dim=12)
    with pytest.raises(DuplicateImageIdError, match=r"'a1' is in two inputs: .*a\.tsv:2 and .*c\.tsv:2"):
        convert_tsvs_to_store([*paths, tmp_path / "c.tsv"], tmp_path / "store")
    paths[0].write_bytes(paths[0].read_bytes()[:-10])
    with pytest.raises(TruncatedTsvError, match=r"a\.tsv:3: the last line is truncated"):
        convert_tsvs_to_store(paths, tmp_path / "store")
    assert not (tmp_path / "store").exists() and _leftovers(tmp_path) == []


def test_different_feature_dims_are_refused(tmp_path, two_tsvs):
    paths, _ = two_tsvs
    write_synthetic_tsv(tmp_path / "wide.tsv", ["w0"], num_boxes=2, dim=13)
    with pytest.raises(FeatureFileError, match=r"wide\.tsv:1 \(img_id 'w0'\): features have dim 13, earlier .* 12"):
        convert_tsvs_to_store([*paths, tmp_path / "wide.tsv"], tmp_path / "store")


def test_damaged_store_names_the_file(tmp_path, two_tsvs):
    paths, _ = two_tsvs
    convert_tsvs_to_store(paths, tmp_path / "store")
    boxes = tmp_path / "store" / "boxes.npy"
    np.save(boxes, np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(FeatureFileError, match=rf"{boxes}: float32\(3, 4\), meta.json implies float32\(47, 4\)"):
        FeatureStore(tmp_path / "store").get("a0")
    (tmp_path / "store" / "meta.json").unlink()
    with pytest.raises(FeatureFileError, match="is not a feature store: meta.json is missing"):
        FeatureStore(tmp_path / "store")


def test_edited_img_ids_are_detected(tmp_path, two_tsvs):
    """Swapping two ids in img_ids.json would serve each image's rows under the other's id: refused on open."""
    paths, records = two_tsvs
    convert_tsvs_to_store(paths, tmp_path / "store")
    ids_file = tmp_path / "store" / "img_ids.json"
    ids = json.loads(ids_file.read_text())
    ids[0], ids[1] = ids[1], ids[0]
    ids_file.write_text(json.dumps(ids))
    with pytest.raises(FeatureFileError, match=rf"{ids_file} was modified after conversion"):
        FeatureStore(tmp_path / "store")


def test_store_refuses_boxes_outside_the_image(tmp_path, two_tsvs):
    paths, _ = two_tsvs
    store = convert_tsvs_to_store(paths, tmp_path / "store")
    boxes = np.load(tmp_path / "store" / "boxes.npy")
    boxes[0, 2] = 1e6
    np.save(tmp_path / "store" / "boxes.npy", boxes)
    with pytest.raises(FeatureFileError, match=r"\(row 0\) \(img_id 'a0'\): box 0 .* leaves the image"):
        FeatureStore(store.directory).get("a0")


def test_sources_mix_stores_and_tsvs(tmp_path, two_tsvs):
    paths, records = two_tsvs
    convert_tsvs_to_store(paths[:1], tmp_path / "store")
    source = open_feature_source([tmp_path / "store", paths[1]])
    assert isinstance(source, MergedFeatureSource)
    assert source.describe() == "1 feature store + 1 TSV file (5 images)"
    for record in records:
        assert_same_bits(source.get(record.img_id), record)
    assert isinstance(open_feature_source(tmp_path / "store"), FeatureStore)
    with pytest.raises(MissingImageError, match="'zz' not found in feature store"):
        open_feature_source(tmp_path / "store").get("zz")
    with pytest.raises(
        DuplicateImageIdError, match=r"'a0' is in two feature sources: .*store \(row 0\) and .*a\.tsv:1"
    ):
        open_feature_source([tmp_path / "store", paths[0]])


def test_cli_convert(tmp_path, two_tsvs, capsys):
    paths, records = two_tsvs
    assert features_cli(["convert", *map(str, paths), "--out", str(tmp_path / "s")]) == 0
    assert "wrote feature store" in capsys.readouterr().out
    assert_same_bits(FeatureStore(tmp_path / "s").get("a2"), records[2])
    assert features_cli(["convert", str(paths[0]), "--out", str(tmp_path / "s")]) == 2
    assert "exists" in capsys.readouterr().err
