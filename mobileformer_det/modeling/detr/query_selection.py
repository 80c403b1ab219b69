"""Two-stage query selection: every map position's anchor box, the top-scoring positions as the
decoder's initial reference boxes, and Fast NMS to skip duplicates among them. Fixed-size tensor
operations only: all of it exports to ONNX as it is."""
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import box_convert

__all__ = ["DenseProposals", "fast_nms_order", "grid_anchors", "grid_centres", "inverse_sigmoid", "top_positions"]


def inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def grid_centres(spatial_shapes, valid_ratios):
    """Pixel centres of every level, normalised to the valid image: ``[N, S, 2]`` (x, y).

    Args:
        spatial_shapes: list of ``(H_l, W_l)``; valid_ratios: ``[N, L, 2]``.
    """
    device = valid_ratios.device
    points = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        y, x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, device=device), torch.linspace(0.5, w - 0.5, w, device=device),
            indexing="ij",
        )
        xy = torch.stack([x.reshape(-1) / w, y.reshape(-1) / h], -1)             # padded-normalised
        points.append(xy[None] / valid_ratios[:, None, lvl])                    # valid-normalised
    return torch.cat(points, 1)


def grid_anchors(spatial_shapes, valid_ratios, padding_mask=None):
    """One anchor box per map position: its centre, side ``0.05 * 2 ** level`` of the image.

    Returns:
        anchors ``[N, S, 4]`` cxcywh normalised to the valid image; valid ``[N, S]`` bool, the
        positions whose anchor lies inside the image (and not on padding).
    """
    centres = grid_centres(spatial_shapes, valid_ratios)                        # [N, S, 2]
    level_sizes = torch.cat([
        torch.full((h * w,), 0.05 * 2.0 ** lvl, device=centres.device) for lvl, (h, w) in enumerate(spatial_shapes)
    ])
    anchors = torch.cat([centres, level_sizes[None, :, None].expand(*centres.shape[:2], 2)], -1)
    # Deformable DETR's (0.01, 0.99), both ends lowered by 5e-7: the centre (x + 0.5) / v of column x
    # of v valid ones falls exactly on 0.01 or 0.99 when v is 50 x an odd number, and float rounding,
    # which differs between runtimes, would decide. Lowered, such a first column is valid and such a
    # last one invalid, and every other centre keeps its exact answer (it is at least 1 / (200 v) away
    # from either end) on maps up to 10000 positions wide.
    valid = ((anchors > 0.01 - 5e-7) & (anchors < 0.99 - 5e-7)).all(-1)
    if padding_mask is not None:
        valid = valid & ~padding_mask
    return anchors, valid


def fast_nms_order(boxes, scores, iou_thresh):
    """Ranking keys that put duplicates last (YOLACT's Fast NMS: a candidate is suppressed when a
    higher-scoring one overlaps it by more than ``iou_thresh``, suppressed or not). Batched; the
    IoU is written out because torchvision's ``box_iou`` is 2-D only.

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


def top_positions(scores, k, nms_thresh=0.0, boxes_of=None):
    """The ``k`` best positions of each image: ``[N, k]`` indices.

    Args:
        scores: ``[N, S]`` (``-inf`` where a position may not be chosen).
        nms_thresh: > 0: Fast NMS at this IoU over the best ``4 * k`` candidates first, whose boxes
            ``boxes_of(candidates [N, 4k]) -> [N, 4k, 4]`` (normalised cxcywh) gives.
    """
    if nms_thresh <= 0:
        return scores.topk(k, dim=1)[1]
    with torch.no_grad():
        candidate_scores, candidates = scores.topk(min(4 * k, scores.shape[1]), dim=1)
        keys = fast_nms_order(boxes_of(candidates), candidate_scores, nms_thresh)
        return torch.gather(candidates, 1, keys.topk(k, dim=1)[1])


@dataclass
class DenseProposals:
    """Every map position as a proposal, for a criterion that assigns them to targets (training).

    ``logits`` ``[N, S, K]``; ``anchors`` ``[N, S, 4]`` cxcywh; ``valid`` ``[N, S]`` bool;
    ``features`` ``[N, S, dim]`` (the proposal projection's output); ``box_head`` maps features
    to box offsets in sigmoid space.
    """
    logits: torch.Tensor
    anchors: torch.Tensor
    valid: torch.Tensor
    features: torch.Tensor
    box_head: nn.Module

    def boxes(self, batch, positions):
        """Boxes ``[P, 4]`` (cxcywh in [0, 1]) of the positions ``(batch [P], positions [P])``:
        the box head runs on those positions only."""
        return (self.box_head(self.features[batch, positions]) + inverse_sigmoid(self.anchors[batch, positions])).sigmoid()
