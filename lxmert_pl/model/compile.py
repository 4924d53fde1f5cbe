"""`model.compile`: `torch.compile` the LXRT layers (the config key of eval.py; `compile_layers` in Python).

Each language, object-relationship and cross-modality layer is compiled in place (`nn.Module.compile`). Layers of
one class share their compiled code (their weights are graph inputs), so the whole model costs three graphs
(`BertLayer`, `CrossModalityLayer`, and the last cross layer when it skips unread outputs), not one unrolled
19-layer graph; the embeddings, heads and the Python around them stay eager.

- CPU: inductor's C++ kernels fuse the bias adds, GeLU, residual sums and LayerNorms around the matmuls. Measured on
  the 2-core development machine (bench/README.md): no gain over eager at batch 32 while the first call compiled
  for minutes, so the default is off.
- CUDA: `mode="reduce-overhead"` adds CUDA graphs (one launch per layer instead of ~20 kernels); shapes are static
  per batch shape, and a new shape (another padding length or box count) records a new graph once.

Shapes are compiled dynamic from the start (`dynamic=True`): trimmed batches have other token and box counts, and
a static first graph would be compiled twice (once static, once dynamic at the first new shape).

Scores equal the eager ones up to float rounding (tests/test_speed_paths.py states the tolerance).
"""

from __future__ import annotations

import torch
from torch import nn


def compile_mode(device: torch.device | str) -> str | None:
    """The torch.compile mode for a device: CUDA graphs on CUDA, inductor's default elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


def compiled_layers(model: nn.Module) -> list[nn.Module]:
    """The layers `compile_layers` compiles, in order: language, object-relationship, cross-modality."""
    encoder = model.bert.encoder if hasattr(model, "bert") else model.encoder
    return [*encoder.layer, *encoder.r_layers, *encoder.x_layers]


def compile_layers(model: nn.Module, enabled: bool = True, device: torch.device | str | None = None) -> nn.Module:
    """Compile `model`'s LXRT layers in place when `enabled` (an `LxmertMatchingModel` or `LxrtModel`); returns it.

    `device`: where it will run (default: where its parameters are) — picks the mode (`compile_mode`). Nothing is
    compiled until the first forward, which then takes the compile time."""
    if not enabled:
        return model
    if device is None:
        device = next(model.parameters()).device
    mode = compile_mode(device)
    for layer in compiled_layers(model):
        layer.compile(mode=mode, dynamic=True)
    return model


def run_device(accelerator: str) -> str:
    """The device type a Lightning `trainer.accelerator` setting (cpu | gpu | cuda | auto) will run on."""
    cuda = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    return "cuda" if cuda else "cpu"


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(layer, "_compiled_call_impl", None) is not None for layer in compiled_layers(model))
