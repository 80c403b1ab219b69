"""Dense training of the two-stage proposals (DETA's first-stage assignment) and their duplicate removal."""
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


def fast_nms_order(boxes, scores, iou_thresh):
    """Ranking keys that put duplicates last (YOLACT's Fast NMS: a candidate is suppressed when a
    higher-scoring one overlaps it by more than ``iou_thresh``, suppressed or not). Fixed-size
    tensor operations only, batched: it exports to ONNX as it is.

    Args:
        boxes: ``[N, M, 4]`` normalised cxcywh; scores: ``[N, M]`` logits in descending order.
    Returns:
        ``[N, M]`` float keys: the scores, 1e4 lower where suppressed (logits stay far above -1e4;
        -inf, an invalid position, stays last).
    """
    x0, y0, x1, y1 = box_convert(boxes.float(), "cxcywh", "xyxy").unbind(-1)    # each [N, M]
    w = (torch.minimum(x1[:, :, None], x1[:, None]) - torch.maximum(x0[:, :, None], x0[:, None])).clamp(min=0)
    h = (torch.minimum(y1[:, :, None], y1[:, None]) - torch.maximum(y0[:, :, None], y0[:, None])).clamp(min=0)
    inter = w * h
    area = (x1 - x0) * (y1 - y0)
    iou = inter / (area[:, :, None] + area[:, None] - inter).clamp(min=1e-9)    # [N, M, M]
    index = torch.arange(boxes.shape[1], device=boxes.device)
    earlier = (index[:, None] < index[None, :]).to(iou.dtype)                   # row ranks above column
    suppressed = (iou * earlier).amax(1) > iou_thresh                           # [N, M]
    return scores.float() - 1e4 * suppressed.to(torch.float32)
