"""Resumable, shardable extraction of image folders into an obj36 feature TSV (the engine behind `extract.py`).

Guarantees: every run ends with exactly one complete row per extracted image in the output, even after a killed run
(ids already present are skipped, a truncated last line is cut away, leftover shard files of a killed sharded run
are merged first); unreadable images (and file names that cannot be a TSV img_id) are skipped, counted and listed
with the reason in `<out>.skipped.txt`. The output is only ever appended to when it is proven to be a feature TSV
(`features.lines.prove_feature_tsv`) made with the same settings (`<out>.meta.json`, `features.provenance`), and
only by one run at a time (`<out>.lock`, `features.locking`).
The work runs on Lightning's predict loop (`sharded.py`, whose `run_extraction` is the entry point; it builds on this
module, which never imports it): with several processes (devices, nodes) each global rank K extracts a contiguous
share of the images into `<out>.shardK.tsv`; at the end global rank 0 appends the shards to the output in input
order and removes them. A killed sharded run resumes shard by shard (same processes, same images), else its shards
are merged first.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import UserInputError
from ..features.codec import img_id_problem
from ..features.lines import prove_feature_tsv, repair_tail, repair_truncated
from ..features.locking import lock_path
from ..features.provenance import ExtractionSettings, claim_tsv
from ..fingerprint import file_sha256
from ..features.record import ImageFeatures, box_problem, parse_boxes
from ..features.tsv import TsvWriter, iter_tsv_features, read_img_ids
from .loading import DetectorLoadReport
from .model import BottomUpFasterRCNN
from .preprocess import ImageReadError, read_image
from .selection import BoxSelection

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pbm", ".pgm", ".ppm"}


def image_id(path: str | Path) -> str:
    """The row id of an image file: its name without the extension."""
    return Path(path).stem


def list_images(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image paths from a directory (image files directly in it, sorted by name), a list file (one path per line;
    relative paths are relative to the list file's folder; blank lines and `#` comments skipped) or a sequence of
    paths. Raises UserInputError for a folder without images, a file that is not a list file (an image, a binary
    file, a list none of whose paths exist), or two images with the same img_id."""
    if isinstance(source, (str, Path)):
        source = Path(source)
        if source.is_dir():
            paths = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not paths:
                raise UserInputError(
                    f"no images in {source} (looked for files ending in {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
        elif source.is_file():
            paths = _read_list_file(source)
        else:
            raise FileNotFoundError(f"image folder or list file not found: {source}")
    else:
        paths = [Path(p) for p in source]
    seen: dict[str, Path] = {}
    for path in paths:
        previous = seen.setdefault(image_id(path), path)
        if previous != path:
            raise UserInputError(f"two images have the img_id {image_id(path)!r}: {previous} and {path}")
    return paths


def _read_list_file(source: Path) -> list[Path]:
    not_a_list = f"{source} is not an image folder or a list file (one image path per line)"
    if source.suffix.lower() in IMAGE_EXTENSIONS:
        raise UserInputError(f"{not_a_list}: it is an image; pass its folder, or a list file naming it")
    try:
        lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise UserInputError(f"{not_a_list}: it is not UTF-8 text") from None
    paths = [source.parent / line for line in lines if line and not line.startswith("#")]
    if not paths:
        raise UserInputError(f"{source} lists no image paths")
    if not any(_is_file(path) for path in paths):
        first = str(paths[0]) if len(str(paths[0])) <= 120 else str(paths[0])[:120] + "..."
        raise UserInputError(f"{not_a_list}: none of the {len(paths)} paths it lists exists (first: {first})")
    return paths


def _is_file(path: Path) -> bool:
    """`path.is_file()`, False for a line no file can have (a name too long: a JSON or other text, not a list)."""
    try:
        return path.is_file()
    except OSError:
        return False


def load_given_boxes(path: str | Path) -> dict[str, np.ndarray]:
    """`{img_id: [[x1, y1, x2, y2], ...]}` (original pixels) from a JSON file, as float32 (R, 4) arrays.

    The one loader of boxes files (extract.py --given-boxes, eval.py --boxes). Raises UserInputError naming the
    file (and the img_id) for text that is not JSON, not an object of box lists, or boxes that are not finite or
    are inverted (`features.record.box_problem`; whether they lie inside the image is checked once it is read).
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError:
        raise UserInputError(f"given-boxes file {path} is not UTF-8 text (expected JSON)") from None
    except json.JSONDecodeError as error:
        raise UserInputError(f"given-boxes file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: expected a JSON object {{img_id: [[x1, y1, x2, y2], ...]}}")
    boxes = {}
    for img_id, rows in data.items():
        boxes[str(img_id)] = parse_boxes(rows, f"{path}: boxes of {img_id!r}")
    return boxes


def boxes_digest(boxes: np.ndarray | dict[str, np.ndarray]) -> str:
    """sha256 of given boxes (one image's array, or all of them independent of their order in the file)."""
    digest = hashlib.sha256()
    if isinstance(boxes, dict):
        for img_id in sorted(boxes):
            digest.update(img_id.encode("utf-8") + b"\0" + boxes_digest(boxes[img_id]).encode("ascii"))
    else:
        digest.update(np.ascontiguousarray(boxes, dtype="<f4").tobytes())
    return digest.hexdigest()


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (names included): identifies weights loaded in memory. Hashes the raw
    bytes, so any dtype works (numpy has no bfloat16: the bf16 RoI head)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def extraction_settings(
    model: BottomUpFasterRCNN,
    detector: str,
    detector_sha256: dict[str, str],
    selection: BoxSelection,
    given_boxes: dict[str, np.ndarray] | None,
    given_boxes_sha256: str | None,
) -> ExtractionSettings:
    """The provenance of rows made by `model` with these settings (see `features.provenance`); the proposal
    geometry and the RoI head's precision are the model's own."""
    return ExtractionSettings(
        detector=detector,
        detector_sha256=dict(detector_sha256),
        min_boxes=None if given_boxes is not None else selection.min_boxes,
        max_boxes=None if given_boxes is not None else selection.max_boxes,
        nms_thresh=None if given_boxes is not None else selection.nms_thresh,
        conf_thresh=None if given_boxes is not None else selection.conf_thresh,
        test_min_size=int(model.transform.min_size),
        test_max_size=int(model.transform.max_size),
        given_boxes=given_boxes is not None,
        given_boxes_sha256=given_boxes_sha256,
        geometry=model.geometry,
        precision=model.precision,
        lxmert_pl_version=__version__,
    )


def detector_file_digests(report: DetectorLoadReport) -> dict[str, str]:
    """sha256 of the detector's config and weights files, by file name (cached: `lxmert_pl.fingerprint`)."""
    return {path.name: file_sha256(path) for path in (report.config_path, report.weights_path)}


@dataclass
class ExtractionResult:
    """Counts of one run: rows written, images already present, skipped (path, reason) pairs."""

    written: int = 0
    already_done: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def extract_batches(
    model: BottomUpFasterRCNN,
    paths: Sequence[Path],
    selection: BoxSelection,
    given_boxes: dict[str, np.ndarray] | None,
    batch_size: int,
    write: Callable[[ImageFeatures], None],
    on_skip: Callable[[str, str], None],
    on_progress: Callable[[int], None],
) -> None:
    """Extract `paths` in batches of `batch_size` images; `write(features)` each row, `on_skip(path, reason)` each
    image that cannot be used, `on_progress(n)` after each batch."""
    for first in range(0, len(paths), batch_size):
        batch = paths[first : first + batch_size]
        readable: list[tuple[Path, str, np.ndarray, np.ndarray | None]] = []
        for path in batch:
            img_id = image_id(path)
            id_problem = img_id_problem(img_id)
            if id_problem:
                on_skip(str(path), f"the file name cannot be a TSV img_id: {id_problem}")
                continue
            boxes = None if given_boxes is None else given_boxes.get(img_id)
            if given_boxes is not None and (boxes is None or boxes.shape[0] == 0):
                on_skip(str(path), f"no boxes for img_id {img_id!r} in the given-boxes file")
                continue
            try:
                image = read_image(path)
            except ImageReadError as error:
                on_skip(str(path), str(error))
                continue
            problem = None if boxes is None else box_problem(boxes, image.shape[1], image.shape[0])
            if problem:
                on_skip(str(path), f"given boxes of img_id {img_id!r}: {problem}")
                continue
            readable.append((path, img_id, image, boxes))
        if readable:
            batch_paths, ids, images, batch_boxes = zip(*readable, strict=True)
            rows = model.extract(list(images), list(ids), selection, None if given_boxes is None else list(batch_boxes))
            for path, features in zip(batch_paths, rows, strict=True):
                if features.num_boxes:
                    write(features)
                else:
                    on_skip(str(path), "the detector found no boxes")
        on_progress(len(batch))


def shard_path(out: Path, k: int) -> Path:
    return out.with_name(f"{out.name}.shard{k}.tsv")


def skipped_path(out: Path) -> Path:
    return out.with_name(f"{out.name}.skipped.txt")


def merge_tsv_rows(sources: Iterable[Path], out: Path, done: set[str]) -> int:
    """Append the complete rows of `sources` (in order) whose img_id is not in `done` to `out`; returns the count
    (`done` is updated). Each source's truncated last line is cut away first."""
    written = 0
    with TsvWriter(out, append=True, repair=True) as writer:
        for source in sources:
            repair_truncated(source)
            for features in iter_tsv_features(source):
                if features.img_id not in done:
                    writer.write(features)
                    done.add(features.img_id)
                    written += 1
    return written


def leftover_shards(out: Path) -> list[Path]:
    """The shard files `<out>.shardK.tsv` beside `out` (left by an interrupted run), by K."""
    pattern = re.compile(re.escape(out.name) + r"\.shard(\d+)\.tsv$")
    found = [(int(m.group(1)), p) for p in out.parent.glob(f"{out.name}.shard*.tsv") if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


@dataclass(frozen=True)
class ExtractionJob:
    """What every process needs to extract images the same way."""

    selection: BoxSelection
    given_boxes: dict[str, np.ndarray] | None
    batch_size: int


def open_output(out: Path, settings: ExtractionSettings, log: Callable[[str], None]) -> set[str]:
    """Check that `out` may take rows made with `settings` (without modifying it), then complete its last line;
    returns the img_ids already present. Leftover shard files count as rows of `out`. Call with the lock held."""
    has_rows = out.exists() and out.stat().st_size > 0
    if has_rows:
        prove_feature_tsv(out)
    claim_tsv(out, settings, has_rows=has_rows or bool(leftover_shards(out)))
    if not has_rows:
        return set()
    repaired = repair_tail(out)
    if repaired.removed_bytes or repaired.newline_added:
        log(f"{repaired.describe(out)} (left by an interrupted run)")
    return set(read_img_ids(out))


def merge_leftover_shards(out: Path, done: set[str], log: Callable[[str], None]) -> None:
    """Append the rows of an interrupted run's shard files to `out` (without duplicates; `done` is updated) and
    remove them. Call with the lock held."""
    leftovers = leftover_shards(out)
    if leftovers:
        merged = merge_tsv_rows(leftovers, out, done)
        log(f"merged {merged} rows from {len(leftovers)} shard file(s) of an interrupted run")
        remove_shards(leftovers)


def remove_shards(shards: Iterable[Path]) -> None:
    """Delete shard files and their lock files (once merged, with every writer done)."""
    for shard in shards:
        shard.unlink(missing_ok=True)
        lock_path(shard).unlink(missing_ok=True)


def skip_line(path: str, reason: str) -> str:
    """One line of `<out>.skipped.txt`: path TAB reason (a path holding tabs or line breaks is written escaped)."""
    if any(char in path for char in "\t\r\n"):
        path = path.encode("unicode_escape").decode("ascii")
    return f"{path}\t{reason}\n"
