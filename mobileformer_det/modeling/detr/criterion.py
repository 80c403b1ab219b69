"""The set loss: sigmoid focal classification, L1 and GIoU on matched boxes, for every decoder layer."""
import torch
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou_loss, sigmoid_focal_loss


class SetCriterion(nn.Module):
    """Losses of DETR-style set prediction, one loss function for every set of predictions.

    ``forward`` returns ``loss_class``, ``loss_bbox``, ``loss_giou`` of the last decoder layer, the
    same with suffix ``_<i>`` for each earlier layer, ``_enc`` for the two-stage proposals and
    ``_dn`` / ``_dn_<i>`` for the denoising queries, already multiplied by their weights. Object
    queries are matched to the targets (Hungarian); a denoising query's target is the box it was
    made from. Every loss is normalised by the number of target boxes over all workers: one
    all-reduce per step, run by every worker whatever its images hold.
    """

    def __init__(self, num_classes, matcher, weight_class=2.0, weight_bbox=5.0, weight_giou=2.0,
                 focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.weights = {"loss_class": weight_class, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @staticmethod
    def num_boxes(targets, device):
        """Mean number of target boxes per worker, at least 1: a float, or a ``[1]`` tensor on ``device``
        when there are several workers (kept on the device: no host synchronisation)."""
        count = float(sum(len(t["labels"]) for t in targets))
        world_size = comm.get_world_size()
        if world_size == 1:
            return max(count, 1.0)
        total = torch.tensor([count], device=device)
        torch.distributed.all_reduce(total)
        return (total / world_size).clamp(min=1.0)

    def loss_set(self, logits, boxes, targets, indices, normaliser, query_mask=None):
        """The three weighted losses of one set of predictions.

        Args:
            logits: ``[N, Q, K]``; boxes: ``[N, Q, 4]`` normalised cxcywh.
            targets: list of N dicts with ``labels`` ``[T_i]`` and ``boxes`` ``[T_i, 4]``.
            indices: per image, ``(query_indices, target_indices)`` int64 tensors of equal length.
            normaliser: what the sums are divided by.
            query_mask: optional ``[N, Q]`` bool, the queries that count in the class loss (all if None).
        """
        device = logits.device
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([q for q, _ in indices]).to(device)
        matched_labels = torch.cat([t["labels"][j.to(device)] for t, (_, j) in zip(targets, indices)])
        matched_boxes = torch.cat([t["boxes"][j.to(device)] for t, (_, j) in zip(targets, indices)]).float()

        target_classes = torch.zeros_like(logits, dtype=torch.float32)
        target_classes[batch_idx, query_idx, matched_labels] = 1.0
        focal = sigmoid_focal_loss(logits.float(), target_classes, self.focal_alpha, self.focal_gamma, reduction="none")
        if query_mask is not None:
            focal = focal * query_mask[..., None]
        src = boxes[batch_idx, query_idx].float()
        losses = {
            "loss_class": focal.sum() / normaliser,
            "loss_bbox": F.l1_loss(src, matched_boxes, reduction="sum") / normaliser,
            "loss_giou": generalized_box_iou_loss(box_convert(src, "cxcywh", "xyxy"),
                                                  box_convert(matched_boxes, "cxcywh", "xyxy"), reduction="sum") / normaliser,
        }
        return {k: v * self.weights[k] for k, v in losses.items()}

    def forward(self, outputs, targets, enc_outputs=None, denoising=None):
        """
        Args:
            outputs: list over decoder layers of ``(logits [N, D+Q, K], boxes [N, D+Q, 4])``, last =
                final; the first D queries are the denoising ones (D = 0 without ``denoising``).
            targets: list of N dicts: ``labels`` ``[T_i]`` int64, ``boxes`` ``[T_i, 4]`` normalised cxcywh.
            enc_outputs: optional ``{"pred_logits", "pred_boxes"}`` of the two-stage proposals.
            denoising: optional dict of ``build_denoising_queries``.
        Returns:
            dict of scalar losses.
        """
        num_dn = 0 if denoising is None else denoising["query"].shape[1]
        num_boxes = self.num_boxes(targets, outputs[-1][0].device)
        last = len(outputs) - 1
        sets = {("" if i == last else f"_{i}"): (logits[:, num_dn:], boxes[:, num_dn:])
                for i, (logits, boxes) in enumerate(outputs)}
        if enc_outputs is not None:
            sets["_enc"] = (enc_outputs["pred_logits"], enc_outputs["pred_boxes"])
        losses = {}
        for (suffix, (logits, boxes)), indices in zip(sets.items(), self.matcher(list(sets.values()), targets)):
            losses.update({k + suffix: v for k, v in self.loss_set(logits, boxes, targets, indices, num_boxes).items()})
        if denoising is not None:
            normaliser = num_boxes * max(denoising["num_groups"], 1)
            for i, (logits, boxes) in enumerate(outputs):
                suffix = "_dn" if i == last else f"_dn_{i}"
                layer = self.loss_set(logits[:, :num_dn], boxes[:, :num_dn], targets, denoising["indices"],
                                      normaliser, denoising["valid"])
                losses.update({k + suffix: v for k, v in layer.items()})
        return losses
