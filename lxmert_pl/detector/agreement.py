"""How far two runs of the detector on the same image agree (e.g. `precision="bf16"` against "fp32").

Used by the bf16 test and by `bench/extract_speed.py`, which report the same figures: whether the proposals are the
same, how many selected boxes the two selections share, and the per-box cosine of the pooled features
(`region_agreement`). Two runs whose proposals differ (the fast fp32 network against the exact one: float32 rounding
moves RPN logits and reorders near-tied proposals) are compared by what a user writes, the selected boxes matched by
overlap (`selection_agreement`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import box_iou

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


@dataclass(frozen=True)
class SelectionAgreement:
    """The reference run's selected boxes matched one-to-one to the candidate's selected boxes by IoU.

    `matched`: reference boxes with a partner at IoU >= `iou_threshold` (greedy, highest IoU first); over those
    partners: `same_object` (same object id), `min_cosine` (lowest pooled-feature cosine), `min_iou`.
    """

    selected: int
    iou_threshold: float
    matched: int
    same_object: int
    min_cosine: float
    min_iou: float

    @property
    def matched_fraction(self) -> float:
        return self.matched / max(self.selected, 1)

    def describe(self) -> str:
        return (
            f"{self.matched}/{self.selected} selected boxes matched at IoU >= {self.iou_threshold:g} (lowest IoU "
            f"{self.min_iou:.4f}), {self.same_object}/{self.matched} same object id, "
            f"pooled cosine >= {self.min_cosine:.6f}"
        )


def selection_agreement(
    reference: ImageRegions,
    candidate: ImageRegions,
    selection: BoxSelection,
    iou_threshold: float = 0.99,
    background_first: bool = False,
) -> SelectionAgreement:
    """Compare the boxes each run's selection writes (features, boxes, object ids), matched by IoU; proposals may
    differ."""
    chosen_ref = select_boxes(reference.rois, reference.cls_prob, reference.attr_prob, selection, background_first)
    chosen_cand = select_boxes(candidate.rois, candidate.cls_prob, candidate.attr_prob, selection, background_first)
    iou = box_iou(chosen_ref.boxes.double(), chosen_cand.boxes.double())
    pairs: list[tuple[int, int, float]] = []
    while iou.numel() and float(iou.max()) >= iou_threshold:
        flat = int(iou.argmax())
        i, j = divmod(flat, iou.shape[1])
        pairs.append((i, j, float(iou[i, j])))
        iou[i, :] = -1.0
        iou[:, j] = -1.0
    if not pairs:
        return SelectionAgreement(len(chosen_ref.keep), iou_threshold, 0, 0, float("nan"), float("nan"))
    ref_rows = torch.tensor([i for i, _, _ in pairs])
    cand_rows = torch.tensor([j for _, j, _ in pairs])
    ref_pooled = reference.pooled[chosen_ref.keep[ref_rows]].float()
    cand_pooled = candidate.pooled[chosen_cand.keep[cand_rows]].float()
    cosine = torch.nn.functional.cosine_similarity(ref_pooled, cand_pooled, dim=1)
    return SelectionAgreement(
        selected=len(chosen_ref.keep),
        iou_threshold=iou_threshold,
        matched=len(pairs),
        same_object=int((chosen_ref.objects_id[ref_rows] == chosen_cand.objects_id[cand_rows]).sum()),
        min_cosine=float(cosine.min()),
        min_iou=min(value for _, _, value in pairs),
    )


def _keep(region: ImageRegions, selection: BoxSelection, background_first: bool) -> list[int]:
    chosen = select_boxes(region.rois, region.cls_prob, region.attr_prob, selection, background_first)
    return chosen.keep.tolist()
