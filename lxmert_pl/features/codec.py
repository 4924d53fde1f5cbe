"""The row codec of bottom-up-attention feature TSVs (`*_obj36.tsv`): one line <-> one `ImageFeatures`.

Format (the original LXMERT `load_obj_tsv` reads it): one image per line, no header, ten tab-separated fields
`FIELDNAMES`; `img_h`, `img_w`, `num_boxes` are decimal integers, the others base64 of little-endian C-order
arrays: int64 `objects_id`/`attrs_id` (n,), float32 `objects_conf`/`attrs_conf` (n,), float32 `boxes` (n, 4) and
float32 `features` (n, D) (layout: `record.PER_BOX_FIELDS`). Lines end in "\\n" (files written by the original
`csv.DictWriter` end in "\\r\\n"; both are read).

Decoding validates everything the original loader relies on, boxes included (`record.box_problem`: finite,
x1 <= x2, y1 <= y2, inside the image up to the loader's 1e-5 slack); encoding refuses what decoding would refuse.
"""

from __future__ import annotations

import binascii
from pathlib import Path

import numpy as np

from lxmert_pl.features.errors import FeatureFileError
from lxmert_pl.features.record import FEATURE_DTYPE, PER_BOX_FIELDS, ImageFeatures, box_problem

FIELDNAMES = [
    "img_id", "img_h", "img_w", "objects_id", "objects_conf",
    "attrs_id", "attrs_conf", "num_boxes", "boxes", "features",
]  # fmt: skip
_FIELD_POSITION = {name: i for i, name in enumerate(FIELDNAMES)}
# Characters an img_id cannot hold: they would split the row.
FORBIDDEN_ID_CHARACTERS = "\t\r\n"


def img_id_problem(img_id: object) -> str | None:
    """Why `img_id` cannot be the id of a TSV row (not a string, empty, or with a tab/line break), else None."""
    if not isinstance(img_id, str) or not img_id.strip():
        return "an img_id must be a non-empty string"
    if any(char in img_id for char in FORBIDDEN_ID_CHARACTERS):
        return "an img_id cannot contain tabs or line breaks"
    return None


def _location(path: str | Path | None, line_no: int | None) -> str:
    if path is not None and line_no is not None:
        return f"{path}:{line_no}"
    if path is not None:
        return str(path)
    if line_no is not None:
        return f"line {line_no}"
    return "TSV row"


# --------------------------------------------------------------------------------------------------------------
# Row codec
# --------------------------------------------------------------------------------------------------------------


def decode_row(line: str | bytes, *, path: str | Path | None = None, line_no: int | None = None) -> ImageFeatures:
    """Decode and validate one TSV line (with or without its line terminator).

    Raises FeatureFileError naming `path:line_no` (and the img_id once known) for a wrong field count, a
    non-integer or non-positive size field, invalid base64, a byte length that does not match `num_boxes`, or
    NaN/inf in `boxes` or `features`, or boxes that are inverted or leave the image. Arrays are read-only views of
    the decoded bytes, as in the original loader.
    """
    where = _location(path, line_no)
    fields = _split_fields(line.encode("utf-8") if isinstance(line, str) else bytes(line), where)
    img_id = decode_img_id(fields[0], where)
    where = f"{where} (img_id {img_id!r})"
    img_h = _parse_positive_int(fields[_FIELD_POSITION["img_h"]], "img_h", where)
    img_w = _parse_positive_int(fields[_FIELD_POSITION["img_w"]], "img_w", where)
    num_boxes = _parse_positive_int(fields[_FIELD_POSITION["num_boxes"]], "num_boxes", where)
    per_box = {
        name: _decode_array(fields[_FIELD_POSITION[name]], name, dtype, (num_boxes, *trailing), where)
        for name, dtype, trailing in PER_BOX_FIELDS
    }
    features = _decode_features(fields[_FIELD_POSITION["features"]], num_boxes, where)
    _check_finite(per_box["boxes"], "boxes", where)
    _check_finite(features, "features", where)
    problem = box_problem(per_box["boxes"], img_w, img_h)
    if problem:
        raise FeatureFileError(f"{where}: {problem}")
    return ImageFeatures(img_id=img_id, img_h=img_h, img_w=img_w, features=features, **per_box)


def _split_fields(raw: bytes, where: str) -> list[memoryview]:
    """The tab-separated fields of a line, as zero-copy views (rows are ~400 kB: copies cost)."""
    end = len(raw)
    while end and raw[end - 1] in b"\r\n":
        end -= 1
    view = memoryview(raw)
    fields = []
    start = 0
    for _ in range(len(FIELDNAMES) - 1):
        tab = raw.find(b"\t", start, end)
        if tab < 0:
            break
        fields.append(view[start:tab])
        start = tab + 1
    fields.append(view[start:end])
    if len(fields) != len(FIELDNAMES) or raw.find(b"\t", start, end) >= 0:
        found = raw.count(b"\t", 0, end) + 1
        raise FeatureFileError(
            f"{where}: expected {len(FIELDNAMES)} tab-separated fields ({', '.join(FIELDNAMES)}), found {found}"
        )
    return fields


def decode_img_id(raw_id: bytes | memoryview, where: str) -> str:
    try:
        img_id = bytes(raw_id).decode("utf-8")
    except UnicodeDecodeError as err:
        raise FeatureFileError(f"{where}: img_id is not valid UTF-8 ({err})") from None
    if not img_id.strip():
        raise FeatureFileError(f"{where}: empty img_id")
    return img_id


def _parse_positive_int(raw_value: memoryview, name: str, where: str) -> int:
    try:
        value = int(bytes(raw_value))
    except ValueError:
        raise FeatureFileError(f"{where}: field {name!r} is not an integer: {bytes(raw_value[:40])!r}") from None
    if value < 1:
        raise FeatureFileError(f"{where}: field {name!r} must be >= 1, got {value}")
    return value


def _decode_base64(raw_value: memoryview, name: str, where: str) -> bytes:
    try:
        return binascii.a2b_base64(raw_value, strict_mode=True)
    except binascii.Error as err:
        raise FeatureFileError(f"{where}: field {name!r} is not valid base64 ({err})") from None


def _decode_array(raw_value: memoryview, name: str, dtype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    data = _decode_base64(raw_value, name, where)
    item_size = np.dtype(dtype).itemsize
    expected = int(np.prod(shape)) * item_size
    if len(data) != expected:
        raise FeatureFileError(
            f"{where}: field {name!r} holds {len(data)} bytes, expected {expected} "
            f"(shape {shape} of {np.dtype(dtype).name}, from num_boxes={shape[0]})"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _decode_features(raw_value: memoryview, num_boxes: int, where: str) -> np.ndarray:
    data = _decode_base64(raw_value, "features", where)
    row_unit = num_boxes * np.dtype(FEATURE_DTYPE).itemsize
    if not data or len(data) % row_unit:
        raise FeatureFileError(
            f"{where}: field 'features' holds {len(data)} bytes, not a positive multiple of "
            f"num_boxes x 4 = {row_unit} (float32, num_boxes={num_boxes})"
        )
    return np.frombuffer(data, dtype=FEATURE_DTYPE).reshape(num_boxes, -1)


def _check_finite(values: np.ndarray, name: str, where: str) -> None:
    finite = np.isfinite(values)
    if not finite.all():
        first_bad = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise FeatureFileError(
            f"{where}: {name} contain {int((~finite).sum())} NaN/inf value(s), "
            f"first at {first_bad}: {values[first_bad]}"
        )


def _validated_arrays(feat: ImageFeatures) -> dict[str, np.ndarray]:
    """Arrays of `feat` in the file's dtypes, checked so that the reader will accept the row written."""
    where = f"img_id {feat.img_id!r}"
    id_problem = img_id_problem(feat.img_id)
    if id_problem:
        raise ValueError(f"{where}: {id_problem}")
    for name in ("img_h", "img_w"):
        value = getattr(feat, name)
        if int(value) != value or value < 1:
            raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    num_boxes = feat.num_boxes
    if num_boxes < 1:
        raise ValueError(f"{where}: at least one box is needed, got boxes of shape {feat.boxes.shape}")
    arrays = {}
    for name, dtype, trailing in PER_BOX_FIELDS:
        arrays[name] = np.ascontiguousarray(getattr(feat, name), dtype=dtype)
        if arrays[name].shape != (num_boxes, *trailing):
            raise ValueError(f"{where}: {name} has shape {arrays[name].shape}, expected {(num_boxes, *trailing)}")
    features = np.ascontiguousarray(feat.features, dtype=FEATURE_DTYPE)
    if features.ndim != 2 or features.shape[0] != num_boxes or features.shape[1] < 1:
        raise ValueError(f"{where}: features have shape {features.shape}, expected ({num_boxes}, D)")
    arrays["features"] = features
    _check_finite(arrays["boxes"], "boxes", where)
    _check_finite(features, "features", where)
    problem = box_problem(arrays["boxes"], feat.img_w, feat.img_h)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return arrays


def encode_line(feat: ImageFeatures) -> bytes:
    arrays = _validated_arrays(feat)

    def b64(name: str) -> bytes:
        return binascii.b2a_base64(arrays[name].tobytes(), newline=False)

    fields = [
        feat.img_id.encode("utf-8"), b"%d" % feat.img_h, b"%d" % feat.img_w,
        b64("objects_id"), b64("objects_conf"), b64("attrs_id"), b64("attrs_conf"),
        b"%d" % feat.num_boxes, b64("boxes"), b64("features"),
    ]  # fmt: skip
    return b"\t".join(fields) + b"\n"


def encode_row(feat: ImageFeatures) -> str:
    """One TSV line, trailing "\\n" included, that `decode_row` and the original loader decode bit-exactly.

    Arrays are cast to the file's dtypes (int64 ids, float32 otherwise). Raises ValueError naming the img_id for
    shapes that disagree with the box count, an empty box list, NaN/inf in boxes or features, invalid boxes, or an
    img_id that contains tabs or line breaks.
    """
    return encode_line(feat).decode("utf-8")
