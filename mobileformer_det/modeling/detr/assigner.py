"""Dense training of the two-stage proposals: DETA's first-stage assignment (training only; the criterion runs it)."""
import torch
from detectron2.modeling.matcher import Matcher
from torchvision.ops import box_convert, box_iou


class AnchorAssigner:
    """Assign every map position's anchor box to a target by IoU, as an RPN does (DETA, stage 1).

    Detectron2's ``Matcher``: IoU >= ``thresholds[1]`` is positive, < ``thresholds[0]`` negative,
    in between ignored, and each target's best anchors are positive whatever their IoU. Of a
    target's positives only its ``max_per_target`` best by IoU stay positive; the others are ignored.
    """

    def __init__(self, thresholds=(0.3, 0.7), max_per_target=4):
        self.matcher = Matcher(list(thresholds), [0, -1, 1], allow_low_quality_matches=True)
        self.max_per_target = max_per_target

    @torch.no_grad()
    def __call__(self, anchors, valid, targets):
        """
        Args:
            anchors: ``[N, S, 4]`` cxcywh normalised to the image, in ``[0, 1]``.
            valid: ``[N, S]`` bool, the positions that may be chosen.
            targets: list of N dicts with ``labels`` ``[T_i]`` and ``boxes`` ``[T_i, 4]`` normalised cxcywh.
        Returns:
            list over the N images of ``(positions [P_i], target_indices [P_i], counted [S])``: the
            positive positions, their targets, and the positions the class loss counts (positives
            and negatives; not the ignored or invalid ones).
        """
        result = []
        for a, v, t in zip(anchors, valid, targets):
            if len(t["boxes"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64, device=a.device)
                result.append((empty, empty, v))
                continue
            iou = box_iou(box_convert(t["boxes"].float(), "cxcywh", "xyxy"), box_convert(a.float(), "cxcywh", "xyxy"))
            iou = iou * v[None]                                                 # [T, S]; invalid: 0
            matches, labels = self.matcher(iou)
            positive = (labels == 1) & v
            positions = positive.nonzero().squeeze(1)
            gt = matches[positions]
            # keep each target's best positives (DETA's top-k per target): grouped by target, best first
            order = torch.argsort(iou[gt, positions], descending=True, stable=True)
            positions, gt = positions[order], gt[order]
            order = torch.argsort(gt, stable=True)
            positions, gt = positions[order], gt[order]
            rank = torch.arange(len(gt), device=gt.device) - torch.searchsorted(gt, gt)
            keep = rank < self.max_per_target
            counted = v & (labels != -1)
            counted[positions[~keep]] = False
            result.append((positions[keep], gt[keep], counted))
        return result
