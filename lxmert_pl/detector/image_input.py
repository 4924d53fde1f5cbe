"""Any image a user hands over -> the detector's input: a BGR uint8 array (h, w, 3).

A file path is read by `preprocess.read_image` (OpenCV, as `extract.py` and eval's one-step matching read files:
EXIF orientation applied, grey-scale expanded, alpha dropped, 16-bit reduced to 8). A `PIL.Image` and a numpy array
are brought to the same form here, so that the same picture gives the same pixels whichever way it comes:

* `PIL.Image` of any mode: EXIF orientation applied (`ImageOps.exif_transpose`), then grey-scale / palette / CMYK /
  alpha modes converted to RGB (alpha dropped, not composited, as OpenCV's IMREAD_COLOR does), 16-bit and 32-bit
  integer modes reduced to 8 bits by their high byte (OpenCV's rule; PIL's own conversion clips instead).
* numpy array: **RGB** order (as PIL and matplotlib give it), uint8, (h, w, 3); (h, w) grey-scale and (h, w, 4)
  RGBA are accepted (grey expanded, alpha dropped); uint16 is reduced to 8 bits by the high byte. The detector's
  BGR order is internal: the channels are reversed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserInputError
from .preprocess import read_image

# PIL modes whose values use more than 8 bits: reduced to 8 by the high byte of a 16-bit value.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def is_pil_image(image: Any) -> bool:
    """Whether `image` is a `PIL.Image.Image` (without importing PIL when it is not loaded)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL is a dependency
        return False
    return isinstance(image, Image.Image)


def to_bgr(image: str | Path | np.ndarray | Any, name: str = "image") -> np.ndarray:
    """The detector's BGR uint8 (h, w, 3) array of a file path, a `PIL.Image` or an RGB numpy array (see the module
    docstring for the conversions). Raises `ImageReadError` for a file that cannot be read and `UserInputError`
    (naming `name`) for an array or object that is not an image."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if is_pil_image(image):
        return pil_to_bgr(image)
    if isinstance(image, np.ndarray):
        return rgb_array_to_bgr(image, name)
    raise UserInputError(f"{name}: expected a file path, a PIL.Image or an RGB numpy array (h, w, 3), got "
                         f"{type(image).__name__}")


def pil_to_bgr(image: Any) -> np.ndarray:
    """A `PIL.Image` of any mode as BGR uint8 (h, w, 3): EXIF orientation applied, converted to RGB."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_MODES:
        values = np.asarray(image).astype(np.int64)
        grey = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if image.mode == "F":
        raise UserInputError(f"a floating-point PIL image (mode 'F', {image.size[0]}x{image.size[1]}) has no "
                             "defined 8-bit colours: convert it to 'L' or 'RGB' first")
    rgb = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def rgb_array_to_bgr(array: np.ndarray, name: str = "image") -> np.ndarray:
    """An RGB (or grey (h, w), or RGBA (h, w, 4)) uint8/uint16 array as BGR uint8 (h, w, 3)."""
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise UserInputError(f"{name}: an image array must be uint8 (or uint16), got {array.dtype}; scale float "
                             "images to 0..255 and cast with .astype(np.uint8)")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.shape[0] == 0 or array.shape[1] == 0:
        raise UserInputError(f"{name}: an image array must be (h, w, 3) RGB, (h, w, 4) RGBA or (h, w) grey, got "
                             f"shape {array.shape}")
    return np.ascontiguousarray(array[:, :, 2::-1])
