"""RoI max pooling, bit-identical to torchvision's `roi_pool` (= caffe's ROIPooling layer), in parallel tensor ops.

The arithmetic of both kernels, reproduced step by step in float32 (SPEC.md §4):
- a box corner becomes a feature cell by `round(coordinate * spatial_scale)`, half away from zero (std::round);
- the RoI spans `max(end - start + 1, 1)` cells per side; bin `i` of `P` covers
  `[floor(i * size / P), ceil((i + 1) * size / P))` cells from the start, with `size / P` and the products in
  float32, then is clipped to the map; an empty bin gives 0, any other its maximum.

torchvision's CPU kernel runs that loop on one thread (0.4 s of a 3 s bf16 image at full size). Here every bin of
every RoI is one row lookup in a table of window maxima: the table for bins of `a` x `b` cells holds, for each
cell, the maximum over the `a` x `b` window starting there, built from the previous table by one `torch.maximum`
of shifted views, so only the tables of bin shapes that occur are looked up, and two are held at a time. A
maximum is exact, so the result is the kernel's bit for bit (NaN aside: the kernel skips NaN, a maximum keeps it).
Rounding to bfloat16 is monotone, so pooling straight to bfloat16 equals pooling in float32 then casting.
"""

from __future__ import annotations

import torch
from torch import nn


class RoIMaxPool(nn.Module):
    """`P` x `P` max pooling of one feature map at boxes, as torchvision's `RoIPool((P, P), spatial_scale)`.

    Args:
        output_size: bins per side (14 for bottom-up attention).
        spatial_scale: feature cells per input pixel (1/16).
    """

    def __init__(self, output_size: int, spatial_scale: float) -> None:
        super().__init__()
        if output_size < 1:
            raise ValueError(f"output_size must be >= 1, got {output_size}")
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"

    def cells(self, boxes: torch.Tensor) -> torch.Tensor:
        """(R, 4) int64 feature cells (x0, y0, x1, y1) of boxes (R, 4) in input pixels, rounded as the kernels do.
        Boxes with the same cells pool the same crop."""
        scaled = boxes.float() * torch.tensor(self.spatial_scale, dtype=torch.float32, device=boxes.device)
        whole = torch.trunc(scaled)
        half_away = torch.where((scaled - whole).abs() >= 0.5, torch.sign(scaled), torch.zeros_like(scaled))
        return (whole + half_away).long()

    def forward(
        self, feature_map: torch.Tensor, boxes: torch.Tensor, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Crops (R, C, P, P) in `dtype`, channels-last, of `feature_map` (1, C, H, W) at `boxes` (R, 4), x0 y0 x1 y1
        in input pixels. The map may be in any float dtype; it is pooled as float32 values rounded to `dtype`."""
        if feature_map.dim() != 4 or feature_map.shape[0] != 1:
            raise ValueError(f"expected one feature map (1, C, H, W), got shape {tuple(feature_map.shape)}")
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"expected boxes (R, 4), got shape {tuple(boxes.shape)}")
        channels, height, width = feature_map.shape[1:]
        size = self.output_size
        count = boxes.shape[0]
        grid = feature_map[0].float().to(dtype).permute(1, 2, 0).contiguous()  # (H, W, C): a bin is a row lookup
        crops = grid.new_empty(count * size * size, channels)
        if count:
            x0, y0, x1, y1 = self.cells(boxes).unbind(1)
            # Per bin of crop row-major order (RoI, bin row, bin column): its first/end row and column.
            row_start, row_end = (t.repeat_interleave(size, dim=1).flatten() for t in self._bins(y0, y1, height))
            col_start, col_end = (t.repeat(1, size).flatten() for t in self._bins(x0, x1, width))
            _window_max_lookup(grid, crops, row_start, row_end, col_start, col_end)
        return crops.view(count, size, size, channels).permute(0, 3, 1, 2)

    def _bins(self, start: torch.Tensor, end: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bin edges along one side: (first cell, end cell) each (R, P), clipped to [0, limit]."""
        size = self.output_size
        cells = torch.clamp(end - start + 1, min=1).float()
        bin_size = cells / torch.tensor(float(size), device=cells.device)
        steps = torch.arange(size + 1, device=cells.device, dtype=torch.float32)
        edges = steps * bin_size[:, None]  # float32 products, as the kernels compute them
        first = torch.floor(edges[:, :-1]).long() + start[:, None]
        last = torch.ceil(edges[:, 1:]).long() + start[:, None]
        return first.clamp(0, limit), last.clamp(0, limit)


def _window_max_lookup(
    grid: torch.Tensor,
    crops: torch.Tensor,
    row_start: torch.Tensor,
    row_end: torch.Tensor,
    col_start: torch.Tensor,
    col_end: torch.Tensor,
) -> None:
    """Fill `crops` (N, C): row n is the maximum of `grid` (H, W, C) over rows [row_start, row_end) and columns
    [col_start, col_end) of bin n, or 0 when that range is empty."""
    width, channels = grid.shape[1], grid.shape[2]
    rows, cols = row_end - row_start, col_end - col_start
    empty = (rows <= 0) | (cols <= 0)
    if bool(empty.any()):
        crops[empty] = 0
    bin_shape = torch.where(empty, -1, rows * (width + 1) + cols)  # one code per (rows, cols) bin shape
    wanted = set(bin_shape.unique().tolist()) - {-1}
    if not wanted:
        return
    most_rows = max(code // (width + 1) for code in wanted)
    most_cols = max(code % (width + 1) for code in wanted)
    column_max = grid  # column_max[h, w] = max of grid[h : h + a, w]
    for a in range(1, most_rows + 1):
        if a > 1:
            column_max = torch.maximum(column_max[:-1], grid[a - 1 :])
        window_max = column_max  # window_max[h, w] = max of grid[h : h + a, w : w + b]
        for b in range(1, most_cols + 1):
            if b > 1:
                window_max = torch.maximum(window_max[:, :-1], column_max[:, b - 1 :])
            code = a * (width + 1) + b
            if code in wanted:
                bins = (bin_shape == code).nonzero().flatten()
                lookup = row_start[bins] * window_max.shape[1] + col_start[bins]
                crops.index_copy_(0, bins, window_max.reshape(-1, channels).index_select(0, lookup))
