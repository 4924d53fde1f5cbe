"""Binary feature store: a directory of memory-mapped `.npy` arrays converted from obj36 TSVs, for repeated runs.

Layout (format version 1)::

    meta.json          format, version, feature dtype, feature dim, counts, the TSVs converted (size, mtime),
                       the sha256 of img_ids.json (an edited id list is detected on open)
    img_ids.json       the img_ids, in row order
    images.npy         int64 (N, 4): first box row, num_boxes, img_h, img_w of each image
    features.npy       float32 (T, D), or float16 when converted with fp16=True: the boxes of all images, concatenated
    boxes.npy          float32 (T, 4), pixels of the original image, as in the TSV
    objects_id.npy     int64 (T,)      objects_conf.npy   float32 (T,)
    attrs_id.npy       int64 (T,)      attrs_conf.npy     float32 (T,)

Why this format:

* Random access costs one dict lookup and a slice: no decoding, no parsing, no index to build. Reading an image
  touches only its own pages of the files.
* Memory-mapping lets the OS page cache hold the data once for all DataLoader workers and all processes of a node
  (DDP ranks), instead of one private copy per process; the reader's own memory stays small.
* One flat array per field handles variable box counts without padding and keeps each image's boxes contiguous.
* `.npy` is plain numpy: every file opens with `np.load(path, mmap_mode="r")`, with no dependency beyond numpy
  (HDF5 or LMDB would add one, and HDF5 does not share pages between forked readers as simply).
* Exact: float32 values are the TSV's bytes, so features are bit-identical to the TSV's. `fp16=True` halves the
  size of features.npy and says so in meta.json and `describe()`; it is lossy (about 3 significant digits) and
  readers still return float32.

Conversion reads the TSVs once, sequentially, appending to each array (the `.npy` header is written last, when the
row count is known), in a temporary directory beside the target that is renamed into place only when complete:
an interrupted or failed conversion leaves no store behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from lxmert_pl.features.errors import DuplicateImageIdError, FeatureFileError, MissingImageError, StaleIndexError
from lxmert_pl.features.record import PER_BOX_FIELDS, ImageFeatures, box_problem
from lxmert_pl.features.tsv import TsvReader

logger = logging.getLogger(__name__)

STORE_FORMAT = "lxmert_pl.feature_store"
STORE_VERSION = 1
META_FILE = "meta.json"
IMG_IDS_FILE = "img_ids.json"
IMAGES_FILE = "images.npy"

_FEATURE_DTYPES = {"float32": "<f4", "float16": "<f2"}


def is_feature_store(path: str | Path) -> bool:
    """Whether `path` is a directory holding a store's meta.json."""
    return (Path(path) / META_FILE).is_file()


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


class _NpyAppender:
    """Writes one `.npy` file row block by row block; the header, which holds the row count, is written on close.

    A fixed 128-byte header region is reserved (the .npy v1.0 format pads its header to a multiple of 64 bytes).
    """

    _HEADER_BYTES = 128
    _MAGIC = b"\x93NUMPY\x01\x00"

    def __init__(self, path: Path, dtype: str, row_shape: tuple[int, ...]):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.row_shape = row_shape
        self.rows = 0
        self._handle: BinaryIO = open(path, "wb")
        self._handle.write(b"\0" * self._HEADER_BYTES)

    def append(self, values: np.ndarray) -> None:
        block = np.ascontiguousarray(values, dtype=self.dtype)
        if block.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {block.shape[1:]}, expected {self.row_shape}")
        self._handle.write(block.tobytes())
        self.rows += block.shape[0]

    def close(self) -> None:
        header = repr(
            {
                "descr": np.lib.format.dtype_to_descr(self.dtype),
                "fortran_order": False,
                "shape": (self.rows, *self.row_shape),
            }
        ).encode("latin1")
        room = self._HEADER_BYTES - len(self._MAGIC) - 2
        if len(header) + 1 > room:
            raise ValueError(f"{self.path.name}: .npy header {header!r} does not fit in {room} bytes")
        padded = header + b" " * (room - len(header) - 1) + b"\n"
        self._handle.seek(0)
        self._handle.write(self._MAGIC + len(padded).to_bytes(2, "little") + padded)
        self._handle.close()

    def release(self) -> None:
        """Close the file without completing it (after a failure; the file is then deleted with its directory)."""
        self._handle.close()


class _StoreWriter:
    """Appends images to the arrays of a store under construction in `directory`."""

    def __init__(self, directory: Path, feature_dtype: str):
        self.directory = directory
        self.feature_dtype = feature_dtype
        self.img_ids: list[str] = []
        self.images: list[tuple[int, int, int, int]] = []
        self.total_boxes = 0
        self.feature_dim: int | None = None
        self._appenders = {
            name: _NpyAppender(directory / f"{name}.npy", dtype, trailing) for name, dtype, trailing in PER_BOX_FIELDS
        }

    def add(self, feat: ImageFeatures, where: str) -> None:
        dim = int(feat.features.shape[1])
        if self.feature_dim is None:
            self.feature_dim = dim
            self._appenders["features"] = _NpyAppender(
                self.directory / "features.npy", _FEATURE_DTYPES[self.feature_dtype], (dim,)
            )
        elif dim != self.feature_dim:
            raise FeatureFileError(f"{where}: features have dim {dim}, earlier rows have {self.feature_dim}")
        if self.feature_dtype == "float16" and np.abs(feat.features).max() > np.finfo(np.float16).max:
            raise FeatureFileError(f"{where}: features exceed the float16 range (+-65504); convert without fp16")
        for name, appender in self._appenders.items():
            appender.append(getattr(feat, name))
        self.img_ids.append(feat.img_id)
        self.images.append((self.total_boxes, feat.num_boxes, feat.img_h, feat.img_w))
        self.total_boxes += feat.num_boxes

    def finish(self, sources: list[dict]) -> None:
        if self.feature_dim is None:
            raise FeatureFileError(f"no rows to convert in {[source['path'] for source in sources]}")
        for appender in self._appenders.values():
            appender.close()
        np.save(self.directory / IMAGES_FILE, np.asarray(self.images, dtype=np.int64).reshape(-1, 4))
        ids_text = json.dumps(self.img_ids)
        (self.directory / IMG_IDS_FILE).write_text(ids_text, encoding="utf-8")
        meta = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "feature_dtype": self.feature_dtype,
            "feature_dim": self.feature_dim,
            "num_images": len(self.img_ids),
            "num_boxes_total": self.total_boxes,
            "img_ids_sha256": hashlib.sha256(ids_text.encode("utf-8")).hexdigest(),
            "sources": sources,
        }
        (self.directory / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    def release(self) -> None:
        for appender in self._appenders.values():
            appender.release()


def convert_tsvs_to_store(
    tsv_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    fp16: bool = False,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FeatureStore:
    """Convert TSVs into one store at `out_dir`, atomically (a temporary directory renamed into place).

    All inputs are indexed first, so a truncated file or an img_id found twice (within or across files) fails
    before anything is written. A bad row fails the conversion naming its file and line, leaving no output.
    `progress(done, total)` is called after each image.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    readers = [TsvReader(path, cache_dir) for path in tsv_paths]
    if not readers:
        raise ValueError("no TSV files to convert")
    _check_disjoint(readers)
    total = sum(len(reader) for reader in readers)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp_dir, ignore_errors=True)
    temp_dir.mkdir()
    try:
        _write_store(readers, temp_dir, "float16" if fp16 else "float32", total, progress)
        _move_into_place(temp_dir, out_dir)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return FeatureStore(out_dir)


def write_store(records: Sequence[ImageFeatures], out_dir: str | Path, sources: Sequence[dict] = ()) -> Path:
    """Write `records` (unique img_ids) as a new float32 store at `out_dir`, atomically (a temporary directory
    renamed into place; an existing `out_dir` is replaced). `sources`: what the rows were made from, recorded in
    meta.json. Used for stores made in memory (the detections cache of `lxmert_pl.detection_cache`)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(temp_dir, ignore_errors=True)
    temp_dir.mkdir()
    try:
        writer = _StoreWriter(temp_dir, "float32")
        try:
            for record in records:
                writer.add(record, f"img_id {record.img_id!r}")
        except BaseException:
            writer.release()
            raise
        writer.finish(list(sources))
        _move_into_place(temp_dir, out_dir)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return out_dir


def _check_disjoint(readers: Sequence[TsvReader]) -> None:
    owner: dict[str, TsvReader] = {}
    for reader in readers:
        for img_id in reader.index.img_ids:
            first = owner.setdefault(img_id, reader)
            if first is not reader:
                raise DuplicateImageIdError(
                    f"img_id {img_id!r} is in two inputs: {first.location(img_id)} and {reader.location(img_id)}"
                )


def _write_store(
    readers: Sequence[TsvReader],
    directory: Path,
    feature_dtype: str,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    writer = _StoreWriter(directory, feature_dtype)
    try:
        _append_rows(readers, writer, total, progress)
    except BaseException:
        writer.release()
        raise
    sources = [
        {"path": str(reader.path.resolve()), "size": reader.index.tsv_size, "mtime_ns": reader.index.tsv_mtime_ns}
        for reader in readers
    ]
    writer.finish(sources)


def _append_rows(
    readers: Sequence[TsvReader], writer: _StoreWriter, total: int, progress: Callable[[int, int], None] | None
) -> None:
    for reader in readers:
        for row, feat in enumerate(reader.iter_features()):
            if row >= len(reader) or feat.img_id != reader.index.img_ids[row]:
                raise StaleIndexError(f"{reader.path} changed while it was being converted (row {row} differs)")
            writer.add(feat, f"{reader.location(feat.img_id)} (img_id {feat.img_id!r})")
            if progress is not None:
                progress(len(writer.img_ids), total)
    if len(writer.img_ids) != total:
        raise StaleIndexError(f"read {len(writer.img_ids)} rows, the indexes list {total}: did an input change?")


def _move_into_place(temp_dir: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(temp_dir, out_dir)
        return
    old_dir = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old_dir)
    os.replace(temp_dir, out_dir)
    shutil.rmtree(old_dir)


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


class FeatureStore:
    """Random access to a converted store by img_id. Arrays are memory-mapped lazily in each process (picklable).

    `get` returns float32 features (upcast from float16 for an fp16 store) and read-only views of the rest.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.meta = self._read_meta()
        self.feature_dim = int(self.meta["feature_dim"])
        self.feature_dtype = str(self.meta["feature_dtype"])
        self._img_ids = self._read_img_ids()
        self.images = self._read_images()
        self._row_of = {img_id: row for row, img_id in enumerate(self._img_ids)}
        if len(self._row_of) != len(self._img_ids):
            raise FeatureFileError(f"{self.directory / IMG_IDS_FILE}: img_ids are not unique")
        self._arrays: dict[str, np.ndarray] | None = None

    def _read_meta(self) -> dict:
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise FeatureFileError(f"{self.directory} is not a feature store: {META_FILE} is missing")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise FeatureFileError(f"{meta_path}: not valid JSON ({err})") from None
        if meta.get("format") != STORE_FORMAT or meta.get("version") != STORE_VERSION:
            raise FeatureFileError(
                f"{meta_path}: not a version-{STORE_VERSION} {STORE_FORMAT} (format {meta.get('format')!r}, "
                f"version {meta.get('version')!r})"
            )
        if meta.get("feature_dtype") not in _FEATURE_DTYPES:
            raise FeatureFileError(f"{meta_path}: unknown feature_dtype {meta.get('feature_dtype')!r}")
        return meta

    def _read_img_ids(self) -> list[str]:
        ids_path = self.directory / IMG_IDS_FILE
        try:
            raw = ids_path.read_bytes()
            img_ids = json.loads(raw.decode("utf-8"))
        except (OSError, ValueError) as err:
            raise FeatureFileError(f"{ids_path}: cannot read the img_id list ({err})") from None
        recorded = self.meta.get("img_ids_sha256")  # absent in stores of older versions
        if recorded is not None and hashlib.sha256(raw).hexdigest() != recorded:
            raise FeatureFileError(
                f"{ids_path} was modified after conversion (its sha256 differs from the one in {META_FILE}): rows "
                "would be read under the wrong img_ids. Convert the TSVs again"
            )
        if not isinstance(img_ids, list) or len(img_ids) != self.meta["num_images"]:
            raise FeatureFileError(f"{ids_path}: expected a list of {self.meta['num_images']} img_ids")
        return [str(img_id) for img_id in img_ids]

    def _read_images(self) -> np.ndarray:
        images = self._load_array(IMAGES_FILE, mmap=False)
        expected = (self.meta["num_images"], 4)
        if images.shape != expected or images.dtype != np.int64:
            raise FeatureFileError(
                f"{self.directory / IMAGES_FILE}: {images.dtype}{images.shape}, expected int64{expected}"
            )
        boxes_total = int(self.meta["num_boxes_total"])
        starts, counts = images[:, 0], images[:, 1]
        if len(images) and (counts.min() < 1 or starts.min() < 0 or (starts + counts).max() > boxes_total):
            raise FeatureFileError(f"{self.directory / IMAGES_FILE}: box ranges outside 0..{boxes_total}")
        return images

    def _load_array(self, file_name: str, *, mmap: bool) -> np.ndarray:
        path = self.directory / file_name
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise FeatureFileError(f"{path}: cannot load ({err})") from None

    def _mapped_arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            boxes_total = int(self.meta["num_boxes_total"])
            expected = {name: (np.dtype(dtype), (boxes_total, *trailing)) for name, dtype, trailing in PER_BOX_FIELDS}
            expected["features"] = (np.dtype(_FEATURE_DTYPES[self.feature_dtype]), (boxes_total, self.feature_dim))
            arrays = {}
            for name, (dtype, shape) in expected.items():
                array = self._load_array(f"{name}.npy", mmap=True)
                if array.dtype != dtype or array.shape != shape:
                    raise FeatureFileError(
                        f"{self.directory / f'{name}.npy'}: {array.dtype}{array.shape}, "
                        f"meta.json implies {dtype}{shape}"
                    )
                arrays[name] = array
            self._arrays = arrays
        return self._arrays

    def __len__(self) -> int:
        return len(self._img_ids)

    def __contains__(self, img_id: object) -> bool:
        return img_id in self._row_of

    @property
    def img_ids(self) -> list[str]:
        return list(self._img_ids)

    def describe(self) -> str:
        dtype = "float16, lossy" if self.feature_dtype == "float16" else "float32"
        return f"feature store {self.directory} ({len(self):,} images, {dtype})"

    def location(self, img_id: str) -> str:
        return f"{self.directory} (row {self._row_of[img_id]})"

    def get(self, img_id: str) -> ImageFeatures:
        row = self._row_of.get(img_id)
        if row is None:
            raise MissingImageError(img_id, [self.describe()])
        start, count, img_h, img_w = (int(value) for value in self.images[row])
        arrays = self._mapped_arrays()
        boxes = slice(start, start + count)
        features = np.asarray(arrays["features"][boxes])
        problem = box_problem(arrays["boxes"][boxes], img_w, img_h)
        if problem:
            raise FeatureFileError(f"{self.location(img_id)} (img_id {img_id!r}): {problem}")
        return ImageFeatures(
            img_id=img_id,
            img_h=img_h,
            img_w=img_w,
            objects_id=np.asarray(arrays["objects_id"][boxes]),
            objects_conf=np.asarray(arrays["objects_conf"][boxes]),
            attrs_id=np.asarray(arrays["attrs_id"][boxes]),
            attrs_conf=np.asarray(arrays["attrs_conf"][boxes]),
            boxes=np.asarray(arrays["boxes"][boxes]),
            features=features if features.dtype == np.float32 else features.astype(np.float32),
        )

    def iter_features(self) -> Iterator[ImageFeatures]:
        """Every image in row order."""
        return (self.get(img_id) for img_id in self._img_ids)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state
