"""One object from raw images and sentences to scores: `Matcher`.

    from lxmert_pl import Matcher
    matcher = Matcher.from_pretrained("lxr955", detector="frcnn-vg-finetuned")
    matcher.score("dog.jpg", ["a dog on a couch", "a plane in the sky"])     # array of P(matched), one per sentence

It ties together the registry (aliases or paths, as eval.py takes them), the Faster R-CNN detector (images ->
region features, with the box selection or at given boxes), a cache of detections keyed by image content
(`lxmert_pl.detection_cache`) and the LXMERT scoring code:

* `score(images, texts)`: element-wise pairs (image i with text i; one image or one text is broadcast). The pairs
  go through eval.py's forward (`scoring.forward_batch`), `batch_size` pairs at a time, the whole model per pair
  (`factorize="never"`, as `Scorer.score`; "auto" encodes an image or sentence repeated within a batch once, as
  eval.py does); eval.py's one-step scores up to float rounding (tests/test_matcher.py: <= 1e-6). A broadcast (one
  image, many texts or the reverse) is a one-row grid and goes through `rank`'s factorized path.
* `rank(images, texts, k=None)`: the full image x text grid, each image and each text encoded once
  (`lxmert_pl.retrieval.Retriever`), or a first stage + top-k re-ranking; with the ground truth
  (`text_image[j]` = the index of text j's image) the retrieval metrics too.
* `detect(image)`: the detections (boxes in pixels, ids, confidences, features).

Images: a file path, a `PIL.Image` (any mode: converted, EXIF orientation applied), a numpy **RGB** uint8 array
(h, w, 3) (see `lxmert_pl.detector.image_input`), an `ImageFeatures` record (precomputed detections), or an img_id
of a feature file passed as `features=`. `Scorer` (lxmert_pl.scoring) stays the low-level API on features.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lxmert_pl.detection_cache import DEFAULT_MEMORY_SIZE, DetectionCache, detection_key, settings_digest
from lxmert_pl.errors import UserInputError
from lxmert_pl.features.record import ImageFeatures, box_problem, parse_boxes
from lxmert_pl.model.heads import LxmertMatchingModel
from lxmert_pl.retrieval import Retriever, check_k, check_mode, pick_score
from lxmert_pl.scoring import check_feature_width, forward_batch, pad_boxes, precision_dtype
from lxmert_pl.tokenizer import LxmertTokenizer

DEFAULT_CKPT = "lxr955"
DEFAULT_DETECTOR = "frcnn-vg-finetuned"
PROGRESS_MIN_IMAGES = 8  # a progress bar is shown when at least this many images need the detector

ImageInput = Any  # str | Path | PIL.Image.Image | np.ndarray | ImageFeatures


DEFAULT_DRAW_BOXES = 10  # boxes drawn, most confident first
DEFAULT_ATTENDED = 3  # attended boxes drawn by `Explanation.draw`


@dataclass
class Detections:
    """The detections of one image: `features.boxes` (n, 4) x1 y1 x2 y2 in pixels of the (EXIF-rotated) image,
    object / attribute ids and confidences, region features (n, D); `labels[i]` names box i ("red circle 0.93",
    from the detector's vocabulary); `name`: the file name, or "image #i"; `picture`: the image (RGB) when the
    detections were made from one (None for precomputed detections)."""

    name: str
    features: ImageFeatures
    labels: list[str] = field(default_factory=list)
    picture: Any = None

    @property
    def boxes(self) -> np.ndarray:
        return self.features.boxes

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image in pixels."""
        return self.features.img_w, self.features.img_h

    def __len__(self) -> int:
        return self.features.num_boxes

    def draw(self, *, attended: Sequence[tuple[int, float]] = (), max_boxes: int = DEFAULT_DRAW_BOXES,
             long_side: int | None = None):
        """A PIL image (RGB): the picture (or a blank canvas of its size) with the `max_boxes` most confident boxes
        and their labels, plus the `attended` (box index, weight) pairs dashed with their weight in percent."""
        from lxmert_pl.drawing import draw_detections

        order = np.argsort(-np.asarray(self.features.objects_conf, dtype=np.float64), kind="stable")
        position = {int(box): rank for rank, box in enumerate(order)}
        labels = [self.labels[i] if i < len(self.labels) else f"box {i}" for i in order]
        return draw_detections(self.picture, self.boxes[order], labels, size=self.size, max_boxes=max_boxes,
                               attended=[(position[int(i)], float(w)) for i, w in attended], long_side=long_side)


@dataclass
class Explanation:
    """Why a text scored so on an image: `weights[i]`, the attention of the text's first token ([CLS]) on box i in
    the last cross-modality layer, mean over heads, summing to 1 over the boxes (see lxmert_pl.explain: where the
    model looked last, not an attribution); `score`: the pair's score."""

    text: str
    score: float
    detections: Detections
    weights: np.ndarray

    def top(self, k: int = DEFAULT_ATTENDED) -> list[tuple[int, float]]:
        """The `k` most attended boxes: (box index, weight), most attended first."""
        order = np.argsort(-self.weights, kind="stable")[:k]
        return [(int(i), float(self.weights[i])) for i in order]

    def describe(self, k: int = DEFAULT_ATTENDED) -> str:
        labels = self.detections.labels
        return ", ".join(f"{labels[i] if i < len(labels) else f'box {i}'} ({w:.0%})" for i, w in self.top(k))

    def draw(self, *, attended: int = DEFAULT_ATTENDED, max_boxes: int = DEFAULT_DRAW_BOXES,
             long_side: int | None = None):
        """The detections drawn with the `attended` most attended boxes dashed, with their weights (PIL, RGB)."""
        return self.detections.draw(attended=self.top(attended), max_boxes=max_boxes, long_side=long_side)


@dataclass
class RankResult:
    """`scores` [num_images, num_texts]: each image's scores of the texts (i2t); `t2i_scores` the same for the
    text -> image direction (equal to `scores` on the full grid; with top-k each keeps its own candidates, the rest
    -inf); `first_stage`: the first stage's scores (top-k only, else None); `metrics`: the retrieval metrics
    (R@1/5/10 both ways, ranks, RSUM; see lxmert_pl.metrics) when the ground truth was given, else {}."""

    scores: np.ndarray
    t2i_scores: np.ndarray
    first_stage: np.ndarray | None
    metrics: dict[str, float]


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto": cuda when available, else cpu; anything else as torch reads it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def box_selection_of(boxes: Any):
    """`boxes=36` (fixed count), `(10, 100)` (adaptive min/max) or a `BoxSelection`."""
    from lxmert_pl.detector.selection import BoxSelection

    if isinstance(boxes, BoxSelection):
        return boxes
    if isinstance(boxes, (int, np.integer)) and not isinstance(boxes, bool):
        low = high = int(boxes)
    elif isinstance(boxes, (tuple, list)) and len(boxes) == 2 and all(isinstance(b, (int, np.integer)) for b in boxes):
        low, high = int(boxes[0]), int(boxes[1])
    else:
        raise UserInputError(f"boxes must be a box count (36) or a (min, max) pair such as (10, 100), got {boxes!r}")
    if not 1 <= low <= high:
        raise UserInputError(f"boxes: need 1 <= min <= max, got {low}, {high}")
    return BoxSelection(low, high)


def _as_list(value: Any, what: str) -> list:
    """A single item (a string, path, image, array, record) as a one-item list; a list/tuple as is."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    if not items:
        raise UserInputError(f"no {what}: got an empty list")
    return items


def broadcast_length(num_images: int, num_texts: int) -> int:
    """Element-wise pairs: equal lengths, or one image / one text for all."""
    if num_images == num_texts or num_texts == 1 or num_images == 1:
        return max(num_images, num_texts)
    raise UserInputError(f"got {num_images} images and {num_texts} texts: score() pairs them element-wise, so "
                         "give as many of each, or one image (or one text) for all; rank() scores every image "
                         "against every text")


class Matcher:
    """Scores raw images against sentences with LXMERT (see the module docstring).

    Build it with `from_pretrained`, or from loaded parts: `model` (an `LxmertMatchingModel`), `detector` (a loaded
    `BottomUpFasterRCNN`, or None to take precomputed detections only). `report` says which weights were loaded.
    `features`: a feature file / store (or a loaded source) whose img_ids may be passed as images. `vocabulary`: a
    `lxmert_pl.vocab.Vocabulary` or the detector's folder to read one from (None: Visual Genome's or fallback names).
    `factorize`: how `score` batches pairs ("never": the whole model per pair; "auto": as eval.py). `cache_dir`,
    `memory_cache`: where detections are kept (`lxmert_pl.detection_cache`). `detector_digests`: sha256 of the
    detector's files, for the cache keys (None: of its tensors).
    """

    def __init__(
        self,
        model: LxmertMatchingModel,
        detector: Any = None,
        *,
        mode: str = "itm",
        boxes: Any = 36,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        cache_dir: str | Path | None = None,
        features: Any = None,
        tokenizer: LxmertTokenizer | None = None,
        batch_size: int = 32,
        factorize: str = "never",
        detector_batch_size: int = 4,
        memory_cache: int = DEFAULT_MEMORY_SIZE,
        progress: bool = True,
        report: str = "",
        detector_digests: Mapping[str, str] | None = None,
        detector_name: str = "detector in memory",
        vocabulary: Any = None,
    ):
        check_mode(model, mode)
        self.device = resolve_device(device)
        self.model = model.eval().to(device=self.device, dtype=precision_dtype(precision))
        self.mode = mode
        self.precision = precision
        self.tokenizer = tokenizer or LxmertTokenizer()
        self.batch_size = batch_size
        self.detector_batch_size = detector_batch_size
        self.progress = progress
        self.report = report or "Weights: a model given in memory (not loaded by Matcher.from_pretrained)"
        self.selection = box_selection_of(boxes)
        self.detector = None if detector is None else detector.to(self.device)
        self._detector_digests = dict(detector_digests) if detector_digests else None
        self._detector_name = detector_name
        self._settings: dict[bool, str] = {}  # given boxes? -> settings digest
        self.cache = DetectionCache(memory_cache, cache_dir)
        self.features = self._open_features(features)
        self.detector_calls = 0  # forward passes of the detector (a batch of images each)
        self.images_detected = 0
        self.factorize = factorize
        self._retriever = Retriever(self.model, self.tokenizer, device=self.device, mode=mode, batch_size=batch_size)
        self._said_truncation = False
        self._vocabulary = vocabulary

    @property
    def vocabulary(self):
        """The names of the detector's classes and attributes (`lxmert_pl.vocab`): the detector's own, else Visual
        Genome's, else "class N" labels. Read on first use (the first labels asked for)."""
        from lxmert_pl.vocab import Vocabulary, load_vocabulary

        if not isinstance(self._vocabulary, Vocabulary):
            self._vocabulary = load_vocabulary(self._vocabulary)
        return self._vocabulary

    # ---- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        ckpt: str | Path = DEFAULT_CKPT,
        detector: str | Path | None = DEFAULT_DETECTOR,
        *,
        mode: str = "itm",
        boxes: Any = 36,
        geometry: str | None = None,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        cache_dir: str | Path | None = None,
        model_config: str | Path | None = None,
        detector_config: str | Path | None = None,
        detector_precision: str = "fp32",
        **kwargs: Any,
    ) -> Matcher:
        """Load LXMERT weights and a detector by registry alias or path, as eval.py does (`--ckpt`, `--detector`,
        `--mode`, `--boxes`, detector.geometry / precision). `detector=None`: no detector (precomputed detections
        only). `boxes`: 36 (obj36) or (10, 100) (adaptive). `device`: "auto" (cuda when available), "cpu", "cuda".
        `precision`: "fp32" | "bf16" for LXMERT; `detector_precision` for the detector's RoI head. `cache_dir`: keep
        detections on disk there (reused by later processes). Other keyword arguments go to `Matcher(...)`.
        `matcher.report` says which weights were loaded."""
        from lxmert_pl.model.loading import load_lxmert
        from lxmert_pl.registry import resolve_checkpoint

        resolved = resolve_checkpoint(str(ckpt))
        model, lxrt_report = load_lxmert(resolved.path, model_config=model_config,
                                         require=("matching",) if mode == "itm" else ())
        lines = [f"Weights: {resolved.describe()}", f"  {lxrt_report.summary()}"]
        device = resolve_device(device)
        loaded_detector = digests = vocabulary = None
        name = "none"
        if detector is not None:
            from lxmert_pl.detector import choose_geometry, load_detector
            from lxmert_pl.detector.extraction import detector_file_digests

            detector_ckpt = resolve_checkpoint(str(detector))
            loaded_detector, detector_report = load_detector(
                detector_ckpt.path, config=detector_config, device=device,
                geometry=choose_geometry(geometry, detector_ckpt.geometry, "geometry"), precision=detector_precision,
            )
            digests = detector_file_digests(detector_report)
            name = str(detector_ckpt.path)
            vocabulary = detector_report.config_path.parent  # its names are read on first use (labels)
            lines += [f"Detector: {detector_ckpt.describe()}", f"  {detector_report.summary()}"]
        return cls(model, loaded_detector, mode=mode, boxes=boxes, device=device, precision=precision,
                   cache_dir=cache_dir, report="\n".join(lines), detector_digests=digests, detector_name=name,
                   vocabulary=vocabulary, **kwargs)

    @staticmethod
    def _open_features(features: Any):
        if features is None or hasattr(features, "img_ids"):
            return features
        from lxmert_pl.features.sources import open_feature_source

        return open_feature_source(features)

    # ---- scoring ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str], *,
              given_boxes: Any = None, features: Any = None) -> np.ndarray:
        """Score pair i = (images[i], texts[i]): P(matched) ("itm") or the max-box cosine ("cosine"), float32 [P].

        One image with many texts, or many images with one text, is broadcast. `given_boxes`: per image (aligned
        with `images`) None or [[x1, y1, x2, y2], ...] in pixels, or a dict / boxes JSON file {img_id: boxes} keyed
        by file name without extension (as eval.py's --given-boxes): features are extracted at these boxes instead
        of the detected ones. `features`: a feature file / store whose img_ids may be given as images.
        """
        image_list, text_list = _as_list(images, "images"), self._texts(texts)
        count = broadcast_length(len(image_list), len(text_list))
        keys, records = self._resolve(image_list, given_boxes, features)
        if count > 1 and (len(image_list) == 1 or len(text_list) == 1):
            grid = self._grid(records, text_list)
            return grid[0] if len(image_list) == 1 else grid[:, 0]
        return self._elementwise(keys, records, text_list)

    @torch.inference_mode()
    def rank(self, images: ImageInput | Sequence[ImageInput], texts: str | Sequence[str], k: int | None = None, *,
             text_image: Sequence[int] | None = None, given_boxes: Any = None, features: Any = None) -> RankResult:
        """Every image against every text: `RankResult.scores` [num_images, num_texts], each image and text encoded
        once. `k`: None for the full grid, or a first stage (no cross layers) keeping each query's top-k for the
        matching head. `text_image[j]`: the index (in `images`) of text j's image, for the retrieval metrics."""
        check_k(k)
        image_list, text_list = _as_list(images, "images"), self._texts(texts)
        if text_image is not None and len(text_image) != len(text_list):
            raise UserInputError(f"text_image has {len(text_image)} entries for {len(text_list)} texts (one image "
                                 "index per text)")
        records = self.image_features(image_list, given_boxes=given_boxes, features=features)
        feats, boxes = self._arrays(records)
        if text_image is None:
            result = self._retriever.rerank(text_list, feats, boxes, k)
        else:
            result = self._retriever.evaluate(text_list, feats, boxes, list(text_image), k)
        first = None if result.first_stage is None else result.first_stage.numpy()
        return RankResult(result.i2t_scores.numpy(), result.t2i_scores.numpy(), first, dict(result.metrics))

    def _grid(self, records: list[ImageFeatures], texts: list[str]) -> np.ndarray:
        feats, boxes = self._arrays(records)
        return self._retriever.rerank(texts, feats, boxes, None).i2t_scores.numpy()

    def _elementwise(self, keys: list[str], records: list[ImageFeatures], texts: list[str]) -> np.ndarray:
        """Pairs `batch_size` at a time through eval.py's forward (`scoring.forward_batch` with `factorize`); `keys`
        say which rows share an image."""
        feats, boxes = self._arrays(records)
        out = []
        for start in range(0, len(texts), self.batch_size):
            part = slice(start, start + self.batch_size)
            batch = self.tokenizer(texts[part])
            batch["features"], batch["boxes"], batch["box_mask"] = pad_boxes(feats[part], boxes[part])
            batch = {name: value.to(self.device) for name, value in batch.items()}
            batch["img_id"] = keys[part]
            out.append(pick_score(forward_batch(self.model, batch, self.factorize), self.mode).numpy())
        return np.concatenate(out)

    def _arrays(self, records: list[ImageFeatures]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-image features and normalised boxes (as the datamodule feeds the model); checks the width once."""
        for record in {id(r): r for r in records}.values():
            check_feature_width(self.model, record.features, record.img_id)
        return [r.features for r in records], [r.normalized_boxes() for r in records]

    def _texts(self, texts: str | Sequence[str]) -> list[str]:
        """Texts as a list; empty ones are errors; longer than the model's input: truncated, said once."""
        text_list = _as_list(texts, "texts")
        for i, text in enumerate(text_list):
            if not isinstance(text, str):
                raise UserInputError(f"text #{i} is a {type(text).__name__}, expected a string: {text!r}")
            if not text.strip():
                raise UserInputError(f"text #{i} is empty or whitespace-only: {text!r}")
        if not self._said_truncation:
            limit = self.tokenizer.max_seq_length - 2
            long = [t for t in dict.fromkeys(text_list) if len(self.tokenizer.tokenize(t)) > limit]
            if long:
                self._said_truncation = True
                warnings.warn(f"{len(long)} text(s) are longer than {limit} word pieces and were truncated to their "
                              f"first {limit} ({self.tokenizer.max_seq_length} tokens with [CLS]/[SEP], as LXMERT "
                              f"was trained), e.g. {long[0]!r}; said once", UserWarning, stacklevel=3)
        return text_list

    # ---- detections ------------------------------------------------------------------------------------------------
    def detect(self, image: ImageInput, *, given_boxes: Any = None, features: Any = None) -> Detections:
        """The detections of one image (from the cache when it was seen before), with labels and the picture.
        `given_boxes`: [[x1, y1, x2, y2], ...] pixels to extract at (or a dict / boxes file keyed by img_id)."""
        boxes = given_boxes if given_boxes is None or isinstance(given_boxes, (str, Path, Mapping)) else [given_boxes]
        source = self._open_features(features) if features is not None else self.features
        record = self.image_features([image], given_boxes=boxes, features=source)[0]
        picture = None
        precomputed = isinstance(image, ImageFeatures) or (isinstance(image, str) and source is not None
                                                           and image in source)
        if not precomputed:
            from PIL import Image

            from lxmert_pl.detector.image_input import to_bgr

            picture = Image.fromarray(np.ascontiguousarray(to_bgr(image)[:, :, ::-1]), "RGB")
        labels = [self.vocabulary.label(int(o), int(a), float(c)) for o, a, c in
                  zip(record.objects_id, record.attrs_id, record.objects_conf)]
        return Detections(_name_of(image, 0), record, labels, picture)

    def explain(self, image: ImageInput, text: str, *, given_boxes: Any = None, features: Any = None) -> Explanation:
        """Which boxes `text` attends to on `image` (the report's "why"): an `Explanation` with the weight of each
        box, its score and the detections; `.draw()` makes the picture."""
        from lxmert_pl.scoring import Scorer

        (text,) = self._texts([text]) if isinstance(text, str) else self._texts(text)
        detections = self.detect(image, given_boxes=given_boxes, features=features)
        record = detections.features
        check_feature_width(self.model, record.features, detections.name)
        scorer = Scorer(self.model, self.tokenizer, device=self.device, batch_size=1)
        with torch.inference_mode():
            weights = scorer.explain([text], [record.features], [record.normalized_boxes()])[0]
        score = float(self.score(record, text)[0])
        return Explanation(text, score, detections, np.asarray(weights, dtype=np.float64))

    def draw(self, image: ImageInput, text: str | None = None, *, given_boxes: Any = None, features: Any = None,
             max_boxes: int = DEFAULT_DRAW_BOXES, attended: int = DEFAULT_ATTENDED, long_side: int | None = None):
        """A PIL image of `image`'s detections; with `text`, its `attended` most attended boxes dashed."""
        if text is None:
            return self.detect(image, given_boxes=given_boxes, features=features).draw(max_boxes=max_boxes,
                                                                                      long_side=long_side)
        return self.explain(image, text, given_boxes=given_boxes, features=features).draw(
            attended=attended, max_boxes=max_boxes, long_side=long_side)

    def image_features(self, images: Sequence[ImageInput], *, given_boxes: Any = None,
                       features: Any = None) -> list[ImageFeatures]:
        """One `ImageFeatures` per image: precomputed, from a feature file, from the cache, or detected now (the
        images that need the detector run in batches of `detector_batch_size`, with a progress bar)."""
        return self._resolve(list(images), given_boxes, features)[1]

    def _resolve(self, images: list[ImageInput], given_boxes: Any,
                 features: Any) -> tuple[list[str], list[ImageFeatures]]:
        """(keys, records): per image, a key that is equal for rows of the same image content (and boxes), and its
        `ImageFeatures`."""
        source = self._open_features(features) if features is not None else self.features
        boxes_of = _given_boxes_lookup(given_boxes, images)
        out: list[ImageFeatures | None] = [None] * len(images)
        keys: list[str] = [""] * len(images)
        # key -> (image, boxes, name, rows) of the images the detector must see; their pixels are decoded again
        # batch by batch there, so that a long list never holds all its images in memory at once
        todo: dict[str, tuple[ImageInput, np.ndarray | None, str, list[int]]] = {}
        decoded: dict[Any, str] = {}  # key of each input object (path or id) and boxes: one decode per call
        for row, image in enumerate(images):
            name = _name_of(image, row)
            if isinstance(image, ImageFeatures):
                if boxes_of(row, image) is not None:
                    raise UserInputError(f"{name}: given boxes cannot apply to precomputed detections")
                out[row], keys[row] = image, f"record {id(image)}"
                continue
            if isinstance(image, str) and source is not None and image in source:
                out[row], keys[row] = source.get(image), f"feature file {id(source)} {image}"
                continue
            memo = (image if isinstance(image, (str, Path)) else id(image), id(boxes_of(row, image)))
            boxes = boxes_of(row, image)
            if memo not in decoded:
                decoded[memo] = self._key_of(image, name, boxes, source)
            key = keys[row] = decoded[memo]
            if key in todo:
                todo[key][3].append(row)
                continue
            cached = self.cache.get(key)
            if cached is not None:
                out[row] = dataclasses.replace(cached, img_id=_row_id(name))
            else:
                todo[key] = (image, boxes, name, [row])
        for key, record in self._run_detector(todo).items():
            for row in todo[key][3]:
                out[row] = dataclasses.replace(record, img_id=_row_id(_name_of(images[row], row)))
        return keys, out  # type: ignore[return-value]

    def _key_of(self, image: ImageInput, name: str, boxes: np.ndarray | None, source: Any) -> str:
        """The detections cache key of an image (decoded here: its pixels are the key) with its given boxes."""
        from lxmert_pl.detector.image_input import to_bgr

        if isinstance(image, (str, Path)) and not Path(image).exists():
            known = f" nor an img_id of {source.describe()}" if source is not None else ""
            raise FileNotFoundError(2, f"image file not found{known}", str(image))
        bgr = to_bgr(image, name)
        if boxes is not None:
            problem = box_problem(boxes, bgr.shape[1], bgr.shape[0])
            if problem or not len(boxes):
                raise UserInputError(f"given boxes of {name}: {problem or 'no boxes'}")
        if self.detector is None:
            raise UserInputError(f"{name}: this Matcher has no detector (detector=None): pass precomputed detections "
                                 "(ImageFeatures, or img_ids with features=FILE)")
        return detection_key(self._settings_digest(boxes is not None), bgr, boxes)

    def _settings_digest(self, given: bool) -> str:
        if given not in self._settings:
            from lxmert_pl.detector.extraction import extraction_settings, state_dict_digest

            digests = self._detector_digests or {"state_dict": state_dict_digest(self.detector)}
            settings = extraction_settings(self.detector, self._detector_name, digests, self.selection,
                                           {} if given else None, None)
            self._settings[given] = settings_digest(settings)
        return self._settings[given]

    def _run_detector(self, todo: dict) -> dict[str, ImageFeatures]:
        """Detect the images of `todo` (key -> (image, boxes, name, rows)), `detector_batch_size` per pass."""
        from lxmert_pl.detector.image_input import to_bgr

        keys = list(todo)
        found: dict[str, ImageFeatures] = {}
        show = self.progress and len(keys) >= PROGRESS_MIN_IMAGES
        with tqdm(total=len(keys), unit="img", desc="detect", disable=not show) as bar:
            for start in range(0, len(keys), self.detector_batch_size):
                part = keys[start : start + self.detector_batch_size]
                given = [todo[k][1] for k in part]
                pixels = [to_bgr(todo[k][0], todo[k][2]) for k in part]
                rows = self.detector.extract(pixels, part, self.selection,
                                             None if all(g is None for g in given) else given)
                self.detector_calls += 1
                self.images_detected += len(part)
                for key, record in zip(part, rows, strict=True):
                    if not record.num_boxes:
                        raise UserInputError(f"{todo[key][2]}: the detector found no boxes")
                    self.cache.put(key, record, {"image": todo[key][2]})
                    found[key] = record
                bar.update(len(part))
        return found


def _row_id(name: str) -> str:
    """An img_id for a detected image's record: its name with characters a TSV id cannot hold replaced."""
    return "".join(c if c.isprintable() and c not in "\t\r\n" else "_" for c in name) or "image"


def _name_of(image: ImageInput, row: int) -> str:
    """A file's name without extension (its img_id), a record's img_id, else "image #row"."""
    if isinstance(image, (str, Path)):
        return Path(image).stem
    if isinstance(image, ImageFeatures):
        return image.img_id
    return f"image #{row}"


def _given_boxes_lookup(given_boxes: Any, images: Sequence[ImageInput]):
    """A function (row, image) -> float32 (R, 4) boxes or None, from `given_boxes`: None, a boxes JSON file, a dict
    {img_id: boxes} (img_id = file name without extension), or a sequence aligned with `images`."""
    if given_boxes is None:
        return lambda row, image: None
    if isinstance(given_boxes, (str, Path)):
        from lxmert_pl.detector.extraction import load_given_boxes

        given_boxes = load_given_boxes(given_boxes)
    if isinstance(given_boxes, Mapping):
        table = {str(k): v for k, v in given_boxes.items()}
        checked: dict[str, np.ndarray] = {}

        def by_name(row: int, image: ImageInput) -> np.ndarray | None:
            if isinstance(image, ImageFeatures):
                return None
            if not isinstance(image, (str, Path)):
                raise UserInputError(f"image #{row}: given boxes keyed by img_id need image paths (the key is the "
                                     "file name without extension); for PIL images or arrays pass a list of boxes, "
                                     "one entry per image")
            name = Path(image).stem
            if name not in table:
                raise UserInputError(f"no given boxes for img_id {name!r} ({image})")
            if name not in checked:
                checked[name] = parse_boxes(table[name], f"given_boxes[{name!r}]")
            return checked[name]

        return by_name
    entries = list(given_boxes)
    if len(entries) != len(images):
        raise UserInputError(f"given_boxes has {len(entries)} entries for {len(images)} images (one list of "
                             "[x1, y1, x2, y2] boxes, or None, per image)")
    arrays = [None if e is None else parse_boxes(e, f"given_boxes[{i}]") for i, e in enumerate(entries)]
    return lambda row, image: arrays[row]


__all__ = ["Matcher", "Detections", "Explanation", "RankResult", "DEFAULT_CKPT", "DEFAULT_DETECTOR"]
