"""The one record every feature source, writer and extractor exchanges (`ImageFeatures`), the schema of its
per-box arrays, and the one check of "these boxes are valid for this image"."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Per-box arrays other than `features`, in TSV column order: (name, little-endian dtype, trailing shape).
# The TSV codec and the binary store both take their layout from here.
PER_BOX_FIELDS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("objects_id", "<i8", ()),
    ("objects_conf", "<f4", ()),
    ("attrs_id", "<i8", ()),
    ("attrs_conf", "<f4", ()),
    ("boxes", "<f4", (4,)),
)
FEATURE_DTYPE = "<f4"  # features are (num_boxes, D)

# How far a normalised box coordinate may leave [0, 1]: the original LXMERT loader asserts boxes / (w, h) lie in
# (-1e-5, 1 + 1e-5).
BOX_TOLERANCE = 1e-5


def box_problem(boxes: np.ndarray, img_w: float | None = None, img_h: float | None = None,
                tol: float = BOX_TOLERANCE) -> str | None:
    """What is wrong with the (x1, y1, x2, y2) pixel boxes of one image, or None when they are valid.

    Valid: shape (n, 4), finite, x1 <= x2 and y1 <= y2, and (when the image size is given) inside
    [0, img_w] x [0, img_h] up to `tol` in normalised units. The message names the first bad box; callers prefix
    the file, line or img_id. Every reader, writer and boxes loader uses this one check.
    """
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        return f"boxes must have shape (n, 4), got {boxes.shape}"
    if not np.isfinite(boxes).all():
        first = tuple(int(i) for i in np.argwhere(~np.isfinite(boxes))[0])
        return f"boxes contain NaN/inf, first at {first}: {boxes[first]}"
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        row = int(np.argmax(inverted))
        return f"box {row} {boxes[row].tolist()} is inverted (x1 y1 x2 y2 needs x2 >= x1 and y2 >= y1)"
    if img_w is not None and img_h is not None and boxes.size:
        scale = np.asarray([img_w, img_h, img_w, img_h], dtype=np.float32)
        normalised = boxes.astype(np.float32) / scale  # float32, as the original loader divides
        outside = ((normalised < -tol) | (normalised > 1 + tol)).any(axis=1)
        if outside.any():
            row = int(np.argmax(outside))
            return (
                f"box {row} {boxes[row].tolist()} leaves the image (w x h = {img_w} x {img_h}; boxes must lie in "
                f"[0, w] x [0, h])"
            )
    return None


def parse_boxes(value, where: str) -> np.ndarray:
    """User-given (x1, y1, x2, y2) pixel boxes of one image (a list of lists, an array) as float32 (n, 4), checked
    by `box_problem`; an empty list is (0, 4). `where` names them in the UserInputError (file and img_id, argument)."""
    from lxmert_pl.errors import UserInputError

    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise UserInputError(f"{where}: not a list of [x1, y1, x2, y2] boxes") from None
    array = array.reshape(0, 4) if array.size == 0 else array
    problem = box_problem(array)
    if problem:
        raise UserInputError(f"{where}: {problem}")
    return array


@dataclass
class ImageFeatures:
    """Detections of one image, as in one obj36 TSV row.

    Boxes are (x1, y1, x2, y2) in pixels of the original image (not normalised).
    """

    img_id: str
    img_h: int
    img_w: int
    objects_id: np.ndarray  # int64 (n,)
    objects_conf: np.ndarray  # float32 (n,)
    attrs_id: np.ndarray  # int64 (n,)
    attrs_conf: np.ndarray  # float32 (n,)
    boxes: np.ndarray  # float32 (n, 4)
    features: np.ndarray  # float32 (n, D)

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])

    def normalized_boxes(self, tol: float = BOX_TOLERANCE) -> np.ndarray:
        """Boxes divided by image width (x) and height (y), as the original loader does.

        Raises ValueError naming the img_id when a result lies outside [0, 1] by more than `tol`.
        """
        boxes = self.boxes.astype(np.float32, copy=True)
        boxes[:, (0, 2)] /= self.img_w
        boxes[:, (1, 3)] /= self.img_h
        if boxes.size and (boxes.min() < -tol or boxes.max() > 1 + tol):
            raise ValueError(
                f"img_id {self.img_id!r}: normalised boxes leave [0, 1] "
                f"(min {boxes.min():.6g}, max {boxes.max():.6g}; image {self.img_w}x{self.img_h} w x h)"
            )
        return boxes
