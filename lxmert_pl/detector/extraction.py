"""Resumable, shardable extraction of image folders into an obj36 feature TSV (the engine behind `extract.py`).

Guarantees: every run ends with exactly one complete row per extracted image in the output, even after a killed run
(ids already present are skipped, a truncated last line is cut away, leftover shard files of a killed sharded run
are merged first); unreadable images (and file names that cannot be a TSV img_id) are skipped, counted and listed
with the reason in `<out>.skipped.txt`. The output is only ever appended to when it is proven to be a feature TSV
(`features.lines.prove_feature_tsv`) made with the same settings (`<out>.meta.json`, `features.provenance`), and
only by one run at a time (`<out>.lock`, `features.locking`).
With `devices > 1` the images are split into contiguous shards, one worker process each (GPU k with cuda), each
writing `<out>.shardK.tsv`; the shards are then appended to the output in input order and removed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import queue
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import __version__
from ..errors import UserInputError
from ..features.codec import img_id_problem
from ..features.lines import prove_feature_tsv, repair_tail, repair_truncated
from ..features.locking import WriteLock
from ..features.provenance import ExtractionSettings, claim_tsv, sha256_of_file
from ..features.record import ImageFeatures, box_problem
from ..features.tsv import TsvWriter, iter_tsv_features, read_img_ids
from .geometry import DEFAULT_GEOMETRY
from .loading import DetectorLoadReport, load_detector
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
    if not any(path.is_file() for path in paths):
        raise UserInputError(f"{not_a_list}: none of the {len(paths)} paths it lists exists (first: {paths[0]})")
    return paths


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
        try:
            array = np.asarray(rows, dtype=np.float32)
        except (TypeError, ValueError):
            raise UserInputError(f"{path}: boxes of {img_id!r} are not a list of [x1, y1, x2, y2]") from None
        array = array.reshape(0, 4) if array.size == 0 else array
        problem = box_problem(array)
        if problem:
            raise UserInputError(f"{path}: boxes of {img_id!r}: {problem}")
        boxes[str(img_id)] = array
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
    """sha256 of every parameter and buffer (names included): identifies weights loaded in memory."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
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
    """sha256 of the detector's config and weights files, by file name."""
    return {path.name: sha256_of_file(path) for path in (report.config_path, report.weights_path)}


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


def _leftover_shards(out: Path) -> list[Path]:
    pattern = re.compile(re.escape(out.name) + r"\.shard(\d+)\.tsv$")
    found = [(int(m.group(1)), p) for p in out.parent.glob(f"{out.name}.shard*.tsv") if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


@dataclass(frozen=True)
class ExtractionJob:
    """What every worker needs to extract images the same way."""

    detector: str | Path
    detector_config: str | Path | None
    selection: BoxSelection
    given_boxes: dict[str, np.ndarray] | None
    batch_size: int
    geometry: str = DEFAULT_GEOMETRY
    precision: str = "fp32"


def run_extraction(
    paths: Sequence[Path],
    out: str | Path,
    detector: str | Path,
    selection: BoxSelection,
    given_boxes: dict[str, np.ndarray] | None = None,
    batch_size: int = 1,
    devices: int = 1,
    device: str = "cpu",
    detector_config: str | Path | None = None,
    log: Callable[[str], None] = print,
    geometry: str = DEFAULT_GEOMETRY,
    precision: str = "fp32",
) -> ExtractionResult:
    """Extract every image of `paths` not yet in `out` (see the module docstring for the guarantees), with the
    detector's `geometry` ("port" or "caffe", `geometry.py`) and `precision` ("fp32" or "bf16": the RoI head's res5
    in bfloat16; proposals and outputs float32)."""
    out = Path(out)
    if not paths:
        raise UserInputError(f"no images to extract into {out}")
    if devices < 1 or batch_size < 1:
        raise ValueError(f"devices and batch_size must be >= 1, got {devices}, {batch_size}")
    if device == "cuda" and devices > torch.cuda.device_count():
        raise ValueError(f"--devices {devices} with cuda, but {torch.cuda.device_count()} GPU(s) are visible")
    _prepare_output_folder(out)
    job = ExtractionJob(detector, detector_config, selection, given_boxes, batch_size, geometry, precision)

    # Loaded here also when workers do the work: it checks the checkpoint and names the weights before anything runs.
    model, report = load_detector(
        detector,
        config=detector_config,
        device=_device_for(device, 0) if devices == 1 else "cpu",
        geometry=geometry,
        precision=precision,
    )
    log(report.summary())
    settings = extraction_settings(
        model, str(detector), detector_file_digests(report), selection, given_boxes,
        None if given_boxes is None else boxes_digest(given_boxes),
    )  # fmt: skip
    with WriteLock(out):
        return _extract_locked(paths, out, model, settings, job, devices, device, log)


def _prepare_output_folder(out: Path) -> None:
    """UserInputError naming `out` for an output path that is a folder, lies under a file, or cannot be written."""
    if out.is_dir():
        raise UserInputError(f"--out {out} is a directory; give a file path, such as {out / 'features.tsv'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [out.parent, *out.parent.parents] if p.exists() and not p.is_dir()), out.parent)
        raise UserInputError(f"cannot create the folder of --out {out}: {blocker} is a file") from None
    except PermissionError as error:
        raise UserInputError(f"cannot create the folder of --out {out}: {error}") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserInputError(f"cannot write --out {out}: permission denied")


def _open_output(out: Path, settings: ExtractionSettings, log: Callable[[str], None]) -> set[str]:
    """Check that `out` may take rows made with `settings` (without modifying it), then complete its last line and
    merge the shards of an interrupted run; returns the img_ids already present. Call with the lock held."""
    leftovers = _leftover_shards(out)
    has_rows = out.exists() and out.stat().st_size > 0
    if has_rows:
        prove_feature_tsv(out)
    claim_tsv(out, settings, has_rows=has_rows or bool(leftovers))
    done: set[str] = set()
    if has_rows:
        repaired = repair_tail(out)
        if repaired.removed_bytes or repaired.newline_added:
            log(f"{repaired.describe(out)} (left by an interrupted run)")
        done = set(read_img_ids(out))
    if leftovers:
        merged = merge_tsv_rows(leftovers, out, done)
        log(f"merged {merged} rows from {len(leftovers)} shard file(s) of an interrupted run")
        for leftover in leftovers:
            leftover.unlink()
    return done


def _skip_line(path: str, reason: str) -> str:
    """One line of `<out>.skipped.txt`: path TAB reason (a path holding tabs or line breaks is written escaped)."""
    if any(char in path for char in "\t\r\n"):
        path = path.encode("unicode_escape").decode("ascii")
    return f"{path}\t{reason}\n"


def _extract_locked(
    paths: Sequence[Path],
    out: Path,
    model: BottomUpFasterRCNN,
    settings: ExtractionSettings,
    job: ExtractionJob,
    devices: int,
    device: str,
    log: Callable[[str], None],
) -> ExtractionResult:
    selection, given_boxes, batch_size = job.selection, job.given_boxes, job.batch_size
    done = _open_output(out, settings, log)
    result = ExtractionResult(already_done=sum(image_id(p) in done for p in paths))
    todo = [p for p in paths if image_id(p) not in done]
    log(
        f"{len(paths)} images: {result.already_done} already in {out}, {len(todo)} to extract "
        f"({selection.describe() if given_boxes is None else 'given boxes'}, batch {batch_size}, "
        f"{devices} x {device}, detector precision {precision})"
    )

    with (
        open(skipped_path(out), "w", encoding="utf-8") as skipped_file,
        tqdm(total=len(todo), unit="img", desc="extract", dynamic_ncols=True) as bar,
    ):

        def on_skip(path: str, reason: str) -> None:
            result.skipped.append((path, reason))
            skipped_file.write(_skip_line(path, reason))
            skipped_file.flush()
            bar.set_postfix(skipped=len(result.skipped))

        if devices == 1:
            with TsvWriter(out, append=True, settings=settings) as writer:

                def write(features: ImageFeatures) -> None:
                    writer.write(features)
                    result.written += 1

                extract_batches(model, todo, selection, given_boxes, batch_size, write, on_skip, bar.update)
        else:
            result.written = _run_shards(todo, out, job, devices, device, on_skip, bar)
    if not result.skipped:
        skipped_path(out).unlink()
    listed = f" (listed in {skipped_path(out)})" if result.skipped else ""
    log(f"wrote {result.written} rows to {out}; skipped {len(result.skipped)} image(s){listed}")
    return result


def _device_for(device: str, k: int) -> str:
    return f"cuda:{k}" if device == "cuda" else "cpu"


def _run_shards(
    todo: Sequence[Path],
    out: Path,
    job: ExtractionJob,
    devices: int,
    device: str,
    on_skip: Callable[[str, str], None],
    bar: tqdm,
) -> int:
    """Run `devices` worker processes on contiguous shards of `todo`, then append their files to `out` in order."""
    bounds = np.linspace(0, len(todo), devices + 1).round().astype(int)
    context = mp.get_context("spawn")  # fork is unsafe once torch's thread pools or CUDA are initialised
    messages = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // devices) if device == "cpu" else None
    workers = [
        context.Process(
            target=_shard_worker,
            args=(
                list(todo[bounds[k] : bounds[k + 1]]),
                shard_path(out, k),
                job,
                _device_for(device, k),
                threads,
                messages,
            ),
        )
        for k in range(devices)
    ]
    for worker in workers:
        worker.start()
    finished = 0
    while finished < devices:
        try:
            kind, *payload = messages.get(timeout=1.0)
        except queue.Empty:
            failed = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
            if failed:
                for worker in workers:
                    worker.terminate()
                raise RuntimeError(
                    f"extraction worker(s) failed (exit codes {failed}); rerun the command to resume"
                ) from None
            continue
        if kind == "progress":
            bar.update(payload[0])
        elif kind == "skip":
            on_skip(*payload)
        else:  # "done"
            finished += 1
    for worker in workers:
        worker.join()
    shards = [shard_path(out, k) for k in range(devices)]
    done = set(read_img_ids(out)) if out.exists() else set()
    written = merge_tsv_rows([s for s in shards if s.exists()], out, done)
    for shard in shards:
        shard.unlink(missing_ok=True)
    return written


def _shard_worker(
    paths: list[Path], shard: Path, job: ExtractionJob, device: str, threads: int | None, messages: mp.Queue
) -> None:
    """One worker process: extract `paths` into `shard`, reporting progress and skips through `messages`."""
    if threads is not None:
        torch.set_num_threads(threads)
    model, _ = load_detector(
        job.detector, config=job.detector_config, device=device, geometry=job.geometry, precision=job.precision
    )
    with TsvWriter(shard, append=True, repair=True) as writer:
        extract_batches(
            model,
            paths,
            job.selection,
            job.given_boxes,
            job.batch_size,
            writer.write,
            lambda path, reason: messages.put(("skip", path, reason)),
            lambda n: messages.put(("progress", n)),
        )
    messages.put(("done",))
