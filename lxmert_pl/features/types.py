"""The one record every feature source, writer and extractor exchanges."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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

    def normalized_boxes(self, tol: float = 1e-5) -> np.ndarray:
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
