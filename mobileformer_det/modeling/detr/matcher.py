"""Hungarian matching between predictions and ground truth (scipy's linear_sum_assignment)."""
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou


def focal_class_cost(logits, labels, alpha=0.25, gamma=2.0):
    """Deformable DETR's classification cost: focal loss of the positive minus that of the negative.

    Args:
        logits: ``[Q, K]``; labels: ``[T]``.
    Returns:
        ``[Q, T]``.
    """
    prob = logits.sigmoid()[:, labels]
    neg = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return pos - neg


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising ``w_class * focal + w_bbox * L1 + w_giou * (-GIoU)``.

    It matches several sets of predictions at once (every decoder layer and the two-stage
    proposals) and copies all their cost matrices to the host in one transfer: on a GPU each
    transfer waits for the stream.
    """

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def cost(self, logits, boxes, target):
        """``logits [Q, K]``, ``boxes [Q, 4]`` cxcywh, a target dict -> cost matrix ``[Q, T]``."""
        return (
            self.cost_class * focal_class_cost(logits, target["labels"], self.focal_alpha, self.focal_gamma)
            + self.cost_bbox * torch.cdist(boxes, target["boxes"], p=1)
            - self.cost_giou * generalized_box_iou(
                box_convert(boxes, "cxcywh", "xyxy"), box_convert(target["boxes"], "cxcywh", "xyxy"))
        )

    @torch.no_grad()
    def forward(self, prediction_sets, targets):
        """
        Args:
            prediction_sets: list of S ``(logits [N, Q_s, K], boxes [N, Q_s, 4] normalised cxcywh)``.
            targets: list of N dicts with ``labels`` ``[T_i]`` and ``boxes`` ``[T_i, 4]`` normalised cxcywh.
        Returns:
            list over the S sets of lists over the N images of ``(query_indices, target_indices)``:
            int64 CPU tensors of equal length ``min(Q_s, T_i)``.
        """
        sizes = [logits.shape[1] for logits, _ in prediction_sets]
        logits = torch.cat([lg.float() for lg, _ in prediction_sets], 1)          # [N, sum Q_s, K]
        boxes = torch.cat([b.float() for _, b in prediction_sets], 1)
        flat = torch.cat([self.cost(lg, b, t).flatten() for lg, b, t in zip(logits, boxes, targets)]).cpu().numpy()
        # A diverged model's NaN predictions would stop scipy here; matched anyhow, they make the
        # loss non-finite, and the trainer stops with the cause (engine.steps._StopsOnDivergence).
        flat = np.nan_to_num(flat, nan=1e9, posinf=1e9, neginf=-1e9)
        bounds = np.cumsum(sizes)[:-1]
        indices = [[] for _ in sizes]
        offset = 0
        for target in targets:
            num = len(target["labels"])
            cost = flat[offset: offset + logits.shape[1] * num].reshape(logits.shape[1], num)
            offset += cost.size
            for s, block in enumerate(np.split(cost, bounds)):
                rows, cols = linear_sum_assignment(block)
                indices[s].append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
