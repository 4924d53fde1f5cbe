"""Reading a weights file (safetensors or a torch pickle) safely, with errors that say what the file really is.

Both checkpoint loaders (`model.loading` for LXRT, `detector.loading` for the Faster R-CNN) read files through
`read_weights_file`: `.safetensors` through safetensors, everything else through `torch.load(weights_only=True)` (a
pickle that needs code execution is refused). Before that, the first bytes are checked, so an empty file, an HTML
page saved under a checkpoint's name (a failed download) or a Git LFS pointer get a message that says so.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from lxmert_pl.errors import CheckpointError

_HTML_STARTS = (b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")
_LFS_POINTER = b"version https://git-lfs"


def sniff_weights_file(path: Path) -> None:
    """CheckpointError when `path` is empty, an HTML/XML page, a Git LFS pointer, an image, JSON, a TSV or other
    text instead of weights (looked at before anything is unpickled)."""
    with open(path, "rb") as f:
        head = f.read(256)
    if not head:
        raise CheckpointError(f"{path}: the file is empty (0 bytes): an interrupted download? Download it again")
    start = head.lstrip().lower()
    if start.startswith(_HTML_STARTS):
        raise CheckpointError(f"{path}: this is a web page (HTML), not a checkpoint: the download returned an "
                              "error or login page. Download the file again from its source")
    if start.startswith(_LFS_POINTER):
        raise CheckpointError(f"{path}: this is a Git LFS pointer, not the weights: fetch the real file "
                              "(`git lfs pull`, or download it directly)")
    kind = _what_else(head)
    if kind is not None:
        raise CheckpointError(f"{path}: this looks like {kind}, not a checkpoint (weights are a PyTorch .pth/.bin/"
                              ".ckpt, a .safetensors file or a folder of them): check the path")


_IMAGE_STARTS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                 (b"BM", "a BMP image"), (b"RIFF", "a WebP image or other RIFF file"), (b"%PDF", "a PDF document"))


def _what_else(head: bytes) -> str | None:
    """What a file that is not weights looks like (an image, JSON, a TSV, text), or None when it may be weights:
    a zip (torch.save), a pickle, a safetensors header, or bytes we cannot tell."""
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or head[8:9] == b"{":
        return None
    for magic, kind in _IMAGE_STARTS:
        if head.startswith(magic):
            return kind
    text = head.decode("utf-8", errors="ignore")
    if not text or any(not (c.isprintable() or c in "\t\r\n") for c in text):
        return None
    first_line = text.lstrip().split("\n", 1)[0]
    if first_line.startswith(("{", "[")):
        return "a JSON file"
    if "\t" in first_line:
        return "a tab-separated text file (a feature TSV?)"
    return f"a text file (it starts {first_line[:40]!r})"


def read_weights_file(path: str | Path) -> object:
    """The object stored in a weights file: a dict of tensors (safetensors) or whatever plain data the pickle holds."""
    path = Path(path)
    sniff_weights_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: the file needs arbitrary code execution to unpickle "
            f"(only plain tensors/dicts are accepted, torch.load(weights_only=True)). Details: {err}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {err}") from err
