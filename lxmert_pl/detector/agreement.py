"""How far two runs of the detector on the same image agree (e.g. `precision="bf16"` against "fp32").

Used by the bf16 test and by `bench/extract_speed.py`, which report the same figures: whether the proposals are the
same, how many selected boxes the two selections share, and the per-box cosine of the pooled features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import ImageRegions
from .selection import BoxSelection, select_boxes


@dataclass(frozen=True)
class RegionAgreement:
    """Agreement of a candidate run with a reference run on one image.

    `same_proposals`: the RoIs are bit-identical (then the figures below compare the same boxes);
    `selected`: boxes the reference selection keeps; `shared`: of those, kept by the candidate too (any position);
    `same_position`: kept at the same position of the written order; `min_cosine`: the lowest cosine similarity
    between the two pooled features of a RoI, over all RoIs (not only the selected ones).
    """

    same_proposals: bool
    selected: int
    shared: int
    same_position: int
    min_cosine: float

    @property
    def shared_fraction(self) -> float:
        return self.shared / max(self.selected, 1)

    def describe(self) -> str:
        return (
            f"proposals {'identical' if self.same_proposals else 'DIFFER'}, selection shares {self.shared}/"
            f"{self.selected} boxes ({self.same_position} at the same position), pooled cosine >= {self.min_cosine:.6f}"
        )


def region_agreement(
    reference: ImageRegions, candidate: ImageRegions, selection: BoxSelection, background_first: bool = False
) -> RegionAgreement:
    """Compare two runs' regions of one image (same RoIs expected: `same_proposals` says whether they are)."""
    same = reference.rois.shape == candidate.rois.shape and torch.equal(reference.rois, candidate.rois)
    keep_ref = _keep(reference, selection, background_first)
    keep_cand = _keep(candidate, selection, background_first)
    if not same:
        return RegionAgreement(False, len(keep_ref), 0, 0, float("nan"))
    cosine = torch.nn.functional.cosine_similarity(reference.pooled.float(), candidate.pooled.float(), dim=1)
    positions = min(len(keep_ref), len(keep_cand))
    return RegionAgreement(
        same_proposals=True,
        selected=len(keep_ref),
        shared=len(set(keep_ref) & set(keep_cand)),
        same_position=sum(a == b for a, b in zip(keep_ref[:positions], keep_cand[:positions], strict=True)),
        min_cosine=float(cosine.min()) if cosine.numel() else 1.0,
    )


def _keep(region: ImageRegions, selection: BoxSelection, background_first: bool) -> list[int]:
    chosen = select_boxes(region.rois, region.cls_prob, region.attr_prob, selection, background_first)
    return chosen.keep.tolist()
