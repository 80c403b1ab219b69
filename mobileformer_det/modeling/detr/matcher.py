"""Hungarian matching between predictions and ground truth (scipy's linear_sum_assignment)."""
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
    """One-to-one assignment minimising ``w_class * focal + w_bbox * L1 + w_giou * (-GIoU)``."""

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def forward(self, logits, boxes, targets):
        """
        Args:
            logits: ``[N, Q, K]``; boxes: ``[N, Q, 4]`` normalised cxcywh.
            targets: list of N dicts with ``labels`` ``[T_i]`` and ``boxes`` ``[T_i, 4]`` normalised cxcywh.
        Returns:
            list of N ``(query_indices, target_indices)`` int64 tensors of equal length ``min(Q, T_i)``.
        """
        indices = []
        for logit, box, target in zip(logits.float(), boxes.float(), targets):
            if len(target["labels"]) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            cost = (
                self.cost_class * focal_class_cost(logit, target["labels"], self.focal_alpha, self.focal_gamma)
                + self.cost_bbox * torch.cdist(box, target["boxes"], p=1)
                - self.cost_giou * generalized_box_iou(
                    box_convert(box, "cxcywh", "xyxy"), box_convert(target["boxes"], "cxcywh", "xyxy"))
            )
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
