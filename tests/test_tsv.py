"""Feature TSV rows, indexed reading, crash-safe writing, truncation repair and the feature CLI."""

from __future__ import annotations

import base64
import csv
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_features import (
    assert_same_bits,
    lock_held_by_another_process,
    make_image_features,
    raw_tsv_line,
    tsv_lines,
    write_synthetic_tsv,
)

from lxmert_pl.features import index as index_module
from lxmert_pl.features.__main__ import main as features_cli
from lxmert_pl.features.sources import open_feature_source
from lxmert_pl.features import (
    FIELDNAMES,
    DuplicateImageIdError,
    FeatureFileError,
    FeatureFileLockedError,
    MissingImageError,
    NotAFeatureTsvError,
    StaleIndexError,
    TruncatedTsvError,
    TsvReader,
    TsvWriter,
    decode_row,
    encode_row,
    iter_tsv_features,
    read_img_ids,
    repair_truncated,
)
from lxmert_pl.features.index import index_locations
from lxmert_pl.features.record import ImageFeatures


def original_load_obj_tsv(path: Path) -> list[dict]:
    """An independent decoder written the way the original LXMERT `load_obj_tsv` reads the format."""
    csv.field_size_limit(sys.maxsize)
    rows = []
    with open(path) as handle:
        for item in csv.DictReader(handle, FIELDNAMES, delimiter="\t"):
            for key in ("img_h", "img_w", "num_boxes"):
                item[key] = int(item[key])
            n = item["num_boxes"]
            decode_config = [
                ("objects_id", (n,), np.int64),
                ("objects_conf", (n,), np.float32),
                ("attrs_id", (n,), np.int64),
                ("attrs_conf", (n,), np.float32),
                ("boxes", (n, 4), np.float32),
                ("features", (n, -1), np.float32),
            ]
            for key, shape, dtype in decode_config:
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype).reshape(shape)
            rows.append(item)
    return rows


@pytest.fixture
def small_tsv(tmp_path: Path) -> tuple[Path, list[ImageFeatures]]:
    path = tmp_path / "feats.tsv"
    records = write_synthetic_tsv(path, [f"img{i}" for i in range(6)], num_boxes=[3, 5, 1, 4, 2, 6], dim=16)
    return path, records


# ----------------------------------------------------------------------------------------------- round trips


def test_writer_rows_decode_bit_exactly_with_the_original_decoder(small_tsv):
    path, records = small_tsv
    decoded = original_load_obj_tsv(path)
    assert len(decoded) == len(records)
    for row, record in zip(decoded, records):
        assert row["num_boxes"] == record.num_boxes
        assert_same_bits(row, record)
    assert path.read_bytes().endswith(b"\n")


def test_encode_decode_round_trip_keeps_every_bit():
    record = make_image_features("COCO_val2014_000000391895", 7, 2048, np.random.default_rng(3))
    line = encode_row(record)
    assert line.endswith("\n") and line.count("\n") == 1 and line.count("\t") == 9
    assert_same_bits(decode_row(line), record)
    assert_same_bits(decode_row(line.encode()), record)


def test_encode_casts_to_the_file_dtypes():
    record = make_image_features("a", 2, 4, np.random.default_rng(0))
    record.objects_id = record.objects_id.astype(np.int32)
    decoded = decode_row(encode_row(record))
    assert decoded.objects_id.dtype == np.int64 and decoded.objects_id.tolist() == record.objects_id.tolist()


def test_crlf_rows_of_the_original_csv_writer_are_read(tmp_path, small_tsv):
    path, records = small_tsv
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    reader = TsvReader(crlf)
    for record in records:
        assert_same_bits(reader.get(record.img_id), record)


def test_encode_rejects_records_the_reader_would_reject():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="img_id 'a\\\\tb'"):
        encode_row(make_image_features("a\tb", 2, 4, rng))
    record = make_image_features("bad", 2, 4, rng)
    record.features = record.features.copy()
    record.features[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"img_id 'bad'.*features.*NaN/inf.*\(1, 2\)"):
        encode_row(record)
    record = make_image_features("short", 3, 4, rng)
    record.objects_conf = record.objects_conf[:2]
    with pytest.raises(ValueError, match="img_id 'short': objects_conf has shape"):
        encode_row(record)


# ----------------------------------------------------------------------------------------------- bad rows


def _row_fields(record: ImageFeatures) -> list[str]:
    return encode_row(record).rstrip("\n").split("\t")


@pytest.fixture
def record() -> ImageFeatures:
    return make_image_features("img_x", 3, 8, np.random.default_rng(5))


def test_wrong_field_count_names_file_and_line(record):
    line = "\t".join(_row_fields(record)[:9])
    with pytest.raises(FeatureFileError, match=r"^f\.tsv:12: expected 10 tab-separated fields .* found 9"):
        decode_row(line, path="f.tsv", line_no=12)


def test_invalid_base64_names_field_file_and_line(record):
    fields = _row_fields(record)
    fields[FIELDNAMES.index("boxes")] = fields[FIELDNAMES.index("boxes")][:-3] + "!=="
    with pytest.raises(FeatureFileError, match=r"f\.tsv:4 \(img_id 'img_x'\): field 'boxes' is not valid base64"):
        decode_row("\t".join(fields), path="f.tsv", line_no=4)


def test_byte_length_must_match_num_boxes(record):
    fields = _row_fields(record)
    fields[FIELDNAMES.index("num_boxes")] = "4"
    with pytest.raises(
        FeatureFileError, match=r"f\.tsv:2 \(img_id 'img_x'\): field 'objects_id' holds 24 bytes, expected 32"
    ):
        decode_row("\t".join(fields), path="f.tsv", line_no=2)


def test_features_length_must_be_a_multiple_of_num_boxes(record):
    fields = _row_fields(record)
    cut = np.frombuffer(base64.b64decode(fields[-1]), dtype=np.uint8)[:-4]
    fields[-1] = base64.b64encode(cut.tobytes()).decode()
    with pytest.raises(FeatureFileError, match=r"field 'features' holds 92 bytes, not a positive multiple of .* 12"):
        decode_row("\t".join(fields), path="f.tsv", line_no=2)


@pytest.mark.parametrize("field_name, bad_value", [("features", np.nan), ("features", np.inf), ("boxes", -np.inf)])
def test_nan_or_inf_is_an_error(record, field_name, bad_value):
    fields = _row_fields(record)
    values = getattr(record, field_name).copy()
    values[2, 1] = bad_value
    fields[FIELDNAMES.index(field_name)] = base64.b64encode(values.tobytes()).decode()
    with pytest.raises(
        FeatureFileError, match=rf"f\.tsv:9 \(img_id 'img_x'\): {field_name} contain 1 NaN/inf .*\(2, 1\)"
    ):
        decode_row("\t".join(fields), path="f.tsv", line_no=9)


def test_non_integer_size_field(record):
    fields = _row_fields(record)
    fields[FIELDNAMES.index("img_h")] = "tall"
    with pytest.raises(FeatureFileError, match=r"f\.tsv:3 \(img_id 'img_x'\): field 'img_h' is not an integer"):
        decode_row("\t".join(fields), path="f.tsv", line_no=3)


def test_bad_row_read_through_the_reader_names_its_line(small_tsv):
    path, _ = small_tsv
    lines = tsv_lines(path)
    fields = lines[3].split("\t")
    fields[FIELDNAMES.index("attrs_conf")] = "@@@@"
    lines[3] = "\t".join(fields)
    path.write_text("".join(lines))
    reader = TsvReader(path)
    assert reader.get("img0").img_id == "img0"
    with pytest.raises(FeatureFileError, match=rf"{path}:4 \(img_id 'img3'\): field 'attrs_conf' is not valid base64"):
        reader.get("img3")


# ----------------------------------------------------------------------------------------------- index


def test_reader_gives_every_row_by_img_id(small_tsv):
    path, records = small_tsv
    reader = TsvReader(path)
    assert reader.img_ids == [r.img_id for r in records] and len(reader) == 6
    for record in reversed(records):
        assert_same_bits(reader.get(record.img_id), record)
    assert "img2" in reader and "nope" not in reader
    assert reader.describe() == f"TSV file {path} (6 images)"
    for decoded, record in zip(reader.iter_features(), records):
        assert_same_bits(decoded, record)


def test_missing_img_id_names_it_and_the_source(small_tsv):
    reader = TsvReader(small_tsv[0])
    expected = r"img_id 'nope' not found in TSV file .*feats\.tsv \(6 images\)"
    with pytest.raises(MissingImageError, match=expected) as caught:
        reader.get("nope")
    assert str(pickle.loads(pickle.dumps(caught.value))) == str(caught.value)


def test_index_is_saved_beside_the_tsv_and_reused(small_tsv, monkeypatch):
    path, _ = small_tsv
    reader = TsvReader(path)
    assert reader.index_path == Path(str(path) + ".idx") and reader.index_path.is_file()

    def no_scan(_path):
        raise AssertionError("the saved index should have been reused")

    monkeypatch.setattr(index_module, "build_index", no_scan)
    assert TsvReader(path).get("img4").img_id == "img4"


def test_index_is_rebuilt_when_the_tsv_changes(tmp_path, small_tsv):
    path, _ = small_tsv
    TsvReader(path)
    new_records = write_synthetic_tsv(path, ["img9", "img0"], num_boxes=2, dim=16, seed=7)
    reader = TsvReader(path)
    assert reader.img_ids == ["img9", "img0"]
    assert_same_bits(reader.get("img0"), new_records[1])


def test_tsv_rewritten_after_the_reader_loaded_its_index(small_tsv):
    path, _ = small_tsv
    reader = TsvReader(path)
    write_synthetic_tsv(path, ["other", "img0"], num_boxes=1, dim=16, seed=1)
    with pytest.raises(StaleIndexError, match="changed .* after its index was loaded"):
        reader.get("img0")


def test_stale_index_with_matching_size_and_mtime_is_caught_on_read(small_tsv):
    path, _ = small_tsv
    TsvReader(path)
    stat = path.stat()
    lines = tsv_lines(path)
    lines[0], lines[1] = lines[1].replace("img1\t", "imgA\t", 1), lines[0].replace("img0\t", "imgB\t", 1)
    path.write_text("".join(lines[:2]) + "".join(lines[2:]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    reader = TsvReader(path)  # the index still looks fresh: same size and mtime
    with pytest.raises(StaleIndexError, match=rf"{path}:1: .*img_id 'img0'.*holds b'imgA\\t.*rewritten"):
        reader.get("img0")


def test_index_goes_to_the_cache_dir_when_the_folder_is_read_only(small_tsv, tmp_path, monkeypatch):
    path, records = small_tsv
    writes = []
    real_write = index_module.write_atomically

    def write_unless_beside_the_tsv(target: Path, text: str) -> None:
        writes.append(target)
        if target.parent == path.parent:
            raise PermissionError(13, "Permission denied", str(target))
        real_write(target, text)

    monkeypatch.setattr(index_module, "write_atomically", write_unless_beside_the_tsv)
    cache = tmp_path / "cache"
    reader = TsvReader(path, cache_dir=cache)
    assert reader.index_path.parent == cache and reader.index_path == index_locations(path, cache)[1]
    assert writes == index_locations(path, cache)
    assert_same_bits(reader.get("img5"), records[5])
    monkeypatch.setattr(index_module, "build_index", lambda _path: pytest.fail("cached index not reused"))
    assert TsvReader(path, cache_dir=cache).index_path.parent == cache


def test_duplicate_img_id_names_both_lines(tmp_path, small_tsv):
    path, _ = small_tsv
    lines = tsv_lines(path)
    path.write_text("".join(lines + [lines[2]]))
    with pytest.raises(DuplicateImageIdError, match=rf"{path}:7: duplicate img_id 'img2' \(first on line 3\)"):
        TsvReader(path)


def test_blank_lines_are_skipped_and_line_numbers_kept(small_tsv):
    path, records = small_tsv
    lines = tsv_lines(path)
    path.write_text("".join(lines[:2]) + "\n" + "".join(lines[2:]))
    reader = TsvReader(path)
    assert len(reader) == 6 and reader.location("img2") == f"{path}:4"
    assert_same_bits(reader.get("img2"), records[2])


def test_reader_is_picklable_and_reopens_lazily(small_tsv):
    path, records = small_tsv
    reader = TsvReader(path)
    reader.get("img1")
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._handle is None
    assert_same_bits(clone.get("img3"), records[3])
    reader.close()


# ----------------------------------------------------------------------------------------------- several files


def test_several_tsvs_open_as_one_source(tmp_path):
    first = write_synthetic_tsv(tmp_path / "a.tsv", ["a0", "a1"], num_boxes=2, dim=4, seed=1)
    second = write_synthetic_tsv(tmp_path / "b.tsv", ["b0"], num_boxes=3, dim=4, seed=2)
    source = open_feature_source([tmp_path / "a.tsv", tmp_path / "b.tsv"])
    assert source.describe() == "2 TSV files (3 images)"
    assert source.img_ids == ["a0", "a1", "b0"]
    assert_same_bits(source.get("b0"), second[0])
    assert_same_bits(pickle.loads(pickle.dumps(source)).get("a1"), first[1])
    assert open_feature_source(str(tmp_path / "*.tsv")).img_ids == ["a0", "a1", "b0"]
    assert open_feature_source([tmp_path / "b.tsv", str(tmp_path / "*.tsv")]).img_ids == ["b0", "a0", "a1"]
    with pytest.raises(MissingImageError, match=r"'zz' not found in TSV file .*a\.tsv.*; TSV file .*b\.tsv"):
        source.get("zz")


def test_img_id_in_two_files_names_both(tmp_path):
    write_synthetic_tsv(tmp_path / "a.tsv", ["x", "shared"], num_boxes=1, dim=4)
    write_synthetic_tsv(tmp_path / "b.tsv", ["y", "z", "shared"], num_boxes=1, dim=4)
    with pytest.raises(DuplicateImageIdError, match=r"'shared' is in two feature sources: .*a\.tsv:2 and .*b\.tsv:3"):
        open_feature_source([tmp_path / "a.tsv", tmp_path / "b.tsv"])


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="feature source not found: .*nope.tsv"):
        open_feature_source(tmp_path / "nope.tsv")
    with pytest.raises(FileNotFoundError, match="no feature file matches"):
        open_feature_source(str(tmp_path / "*.tsv"))
    with pytest.raises(FileNotFoundError, match="not a feature store"):
        open_feature_source(tmp_path)


# ----------------------------------------------------------------------------------------------- writing, truncation


def test_writer_makes_one_write_per_row_and_appends(tmp_path, monkeypatch):
    path = tmp_path / "out.tsv"
    records = write_synthetic_tsv(path, ["a", "b"], num_boxes=2, dim=8)
    sizes = []
    with TsvWriter(path) as writer:
        real_write = writer._handle.write

        def counting_write(data):
            sizes.append(len(data))
            return real_write(data)

        monkeypatch.setattr(writer._handle, "write", counting_write, raising=False)
        extra = make_image_features("c", 3, 8, np.random.default_rng(1))
        writer.write(extra)
    assert sizes == [len(encode_row(extra))]
    assert [row["img_id"] for row in original_load_obj_tsv(path)] == ["a", "b", "c"]
    assert_same_bits(TsvReader(path).get("c"), extra)
    assert_same_bits(TsvReader(path).get("a"), records[0])


def _truncate_mid_row(path: Path, keep_of_last_row: int = 100) -> int:
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: last_start + keep_of_last_row])
    return keep_of_last_row


def test_truncated_tsv_is_reported_with_the_repair_command(small_tsv):
    path, _ = small_tsv
    _truncate_mid_row(path)
    with pytest.raises(
        TruncatedTsvError, match=rf"{path}:6: the last line is truncated \(100 bytes.*features repair {path}"
    ):
        TsvReader(path)
    assert not Path(str(path) + ".idx").exists()


def test_read_img_ids_ignores_a_partial_last_line(small_tsv):
    path, _ = small_tsv
    _truncate_mid_row(path)
    assert read_img_ids(path) == [f"img{i}" for i in range(5)]


def test_repair_drops_the_partial_line_and_reports_bytes(small_tsv):
    path, records = small_tsv
    _truncate_mid_row(path, keep_of_last_row=57)
    assert repair_truncated(path) == 57
    assert repair_truncated(path) == 0
    reader = TsvReader(path)
    assert reader.img_ids == [f"img{i}" for i in range(5)]
    assert_same_bits(reader.get("img4"), records[4])


def test_writer_refuses_to_append_to_a_truncated_file(small_tsv):
    path, _ = small_tsv
    _truncate_mid_row(path)
    before = path.read_bytes()
    with pytest.raises(
        TruncatedTsvError, match=rf"{path} ends in a truncated line.*features repair {path}.*repair=True"
    ):
        TsvWriter(path)
    assert path.read_bytes() == before


def test_writer_repairs_on_request_and_continues(small_tsv):
    path, records = small_tsv
    _truncate_mid_row(path, keep_of_last_row=33)
    extra = make_image_features("img5", 2, 16, np.random.default_rng(9))
    with TsvWriter(path, repair=True) as writer:
        assert writer.repaired_bytes == 33
        writer.write(extra)
    reader = TsvReader(path)
    assert reader.img_ids == [f"img{i}" for i in range(6)]
    assert_same_bits(reader.get("img5"), extra)
    assert_same_bits(reader.get("img4"), records[4])


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_index_check_repair(small_tsv, capsys):
    path, _ = small_tsv
    assert features_cli(["index", str(path)]) == 0
    assert Path(str(path) + ".idx").is_file()
    assert features_cli(["check", str(path)]) == 0
    assert "6 valid rows, feature dim 16, 0 bad rows" in capsys.readouterr().out

    lines = tsv_lines(path)
    lines[1] = lines[1].replace("\t", "\t\t", 1)
    path.write_text("".join(lines))
    _truncate_mid_row(path, keep_of_last_row=20)
    assert features_cli(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "4 valid rows" in out and f"{path}:2" in out and "found 11" in out
    assert "truncated last line (20 bytes)" in out

    assert features_cli(["repair", str(path)]) == 0
    assert "removed a truncated last line of 20 bytes" in capsys.readouterr().out
    assert features_cli(["index", str(tmp := path.with_name("none.tsv"))]) == 2
    assert f"{tmp}" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- reliability (issue 13)


def test_a_complete_last_row_without_its_newline_is_kept(small_tsv, capsys):
    """Repair (library, CLI, writer) keeps a last row that decodes completely and adds its newline; readers read it."""
    path, records = small_tsv
    path.write_bytes(path.read_bytes()[:-1])  # the last row, complete, without "\n"
    assert TsvReader(path).img_ids == [f"img{i}" for i in range(6)]
    assert [row.img_id for row in iter_tsv_features(path)][-1] == "img5" and read_img_ids(path)[-1] == "img5"
    assert features_cli(["repair", str(path)]) == 0
    assert "lacked its final newline; added it" in capsys.readouterr().out
    assert path.read_bytes().endswith(b"\n")
    assert_same_bits(TsvReader(path).get("img5"), records[5])

    path.write_bytes(path.read_bytes()[:-1])
    assert repair_truncated(path) == 0 and path.read_bytes().endswith(b"\n")
    path.write_bytes(path.read_bytes()[:-1])
    extra = make_image_features("img6", 2, 16, np.random.default_rng(3))
    with TsvWriter(path) as writer:
        writer.write(extra)
    assert TsvReader(path).img_ids == [f"img{i}" for i in range(7)]


def test_files_that_are_not_feature_tsvs_are_never_modified(tmp_path, capsys):
    """repair and the writer refuse (naming the file) a JSON file without a final newline, a binary checkpoint,
    and a TSV followed by foreign bytes; not one byte changes."""
    rng = np.random.default_rng(0)
    json_file = tmp_path / "config.json"
    json_file.write_text('{"lr": 0.001,\n "epochs": 3}')
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"PK\x03\x04" + rng.bytes(3000) + b"\n" + rng.bytes(5420))
    tsv_then_junk = tmp_path / "junk.tsv"
    tsv_then_junk.write_bytes(encode_row(make_image_features("a", 2, 4, rng)).encode() + b"\x00\xff binary junk")
    one_line_json = tmp_path / "one_line.json"
    one_line_json.write_text('{"a": [1, 2, 3]}')
    for path in (json_file, checkpoint, tsv_then_junk, one_line_json):
        before = path.read_bytes()
        with pytest.raises(NotAFeatureTsvError, match=rf"{path} is not a feature TSV, so it was not modified"):
            repair_truncated(path)
        with pytest.raises(NotAFeatureTsvError, match=str(path)):
            TsvWriter(path, repair=True)
        assert features_cli(["repair", str(path)]) == 2
        assert f"{path} is not a feature TSV" in capsys.readouterr().err
        assert path.read_bytes() == before, path


def test_a_second_writer_is_refused_and_a_dead_one_leaves_no_stuck_lock(small_tsv):
    path, _ = small_tsv
    before = path.read_bytes()
    with lock_held_by_another_process(path) as holder:
        with pytest.raises(FeatureFileLockedError, match=rf"{path} is being written by another process"):
            TsvWriter(path)
        holder.kill()  # a crashed run: the OS releases its lock
        holder.wait(timeout=30)
        with TsvWriter(path) as writer:
            with TsvWriter(path) as same_process:  # reentrant within one process
                assert same_process.rows_written == 0
            writer.write(make_image_features("img6", 2, 16, np.random.default_rng(1)))
    assert path.read_bytes().startswith(before) and len(read_img_ids(path)) == 7


def test_inverted_boxes_and_boxes_outside_the_image_are_flagged_and_refused(tmp_path, capsys):
    rng = np.random.default_rng(4)
    good, inverted, outside = (make_image_features(name, 3, 8, rng) for name in ("good", "inverted", "outside"))
    inverted.boxes = inverted.boxes.copy()
    inverted.boxes[1, [0, 2]] = inverted.boxes[1, [2, 0]]  # x2 < x1
    outside.boxes = outside.boxes.copy()
    outside.boxes[2, 3] = outside.img_h + 1.0
    path = tmp_path / "boxes.tsv"
    path.write_text("".join(raw_tsv_line(record) for record in (good, inverted, outside)))

    assert features_cli(["check", str(path)]) == 1
    report = capsys.readouterr().out
    assert "1 valid rows" in report and "2 bad rows" in report
    assert f"{path}:2 (img_id 'inverted'): box 1" in report and "is inverted" in report
    assert f"{path}:3 (img_id 'outside'): box 2" in report and "leaves the image" in report
    reader = TsvReader(path)
    assert_same_bits(reader.get("good"), good)
    with pytest.raises(FeatureFileError, match=rf"{path}:2 \(img_id 'inverted'\): box 1 .* is inverted"):
        reader.get("inverted")
    with pytest.raises(FeatureFileError, match=rf"{path}:3 \(img_id 'outside'\): box 2 .* leaves the image"):
        reader.get("outside")
    for record in (inverted, outside):
        with pytest.raises(ValueError, match=f"img_id '{record.img_id}'"):
            encode_row(record)
    edge = make_image_features("edge", 1, 8, rng)
    edge.boxes = np.asarray([[0, 0, edge.img_w * (1 + 5e-6), edge.img_h]], dtype=np.float32)  # within the 1e-5 slack
    assert decode_row(encode_row(edge)).img_id == "edge"
