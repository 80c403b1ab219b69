"""The set loss: sigmoid focal classification, L1 and GIoU on matched boxes, for every decoder layer."""
import torch
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss


class SetCriterion(nn.Module):
    """Losses of DETR-style set prediction.

    ``forward`` returns ``loss_class``, ``loss_bbox``, ``loss_giou`` for the last decoder layer and
    the same with suffix ``_<i>`` for each auxiliary layer and ``_enc`` for the two-stage proposals,
    already multiplied by their weights. Every loss is normalised by the number of target boxes
    over all workers.
    """

    def __init__(self, num_classes, matcher, weight_class=2.0, weight_bbox=5.0, weight_giou=2.0,
                 focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.weights = {"loss_class": weight_class, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def _losses(self, logits, boxes, targets, num_boxes):
        """``logits [N, Q, K]``, ``boxes [N, Q, 4]``: the three weighted losses of one set of predictions."""
        indices = self.matcher(logits, boxes, targets)
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(logits.device)

        target_classes = torch.zeros_like(logits, dtype=torch.float32)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes[batch_idx, query_idx, matched_labels] = 1.0
        loss_class = sigmoid_focal_loss(
            logits.float(), target_classes, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum",
        ) / num_boxes

        src = boxes[batch_idx, query_idx].float()
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_boxes
        if len(tgt):
            giou = torch.diag(generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")))
            loss_giou = (1 - giou).sum() / num_boxes
        else:
            loss_giou = src.sum() * 0.0
        losses = {"loss_class": loss_class, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        return {k: v * self.weights[k] for k, v in losses.items()}

    def _num_boxes(self, targets, device):
        num_boxes = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(num_boxes)
        return (num_boxes / comm.get_world_size()).clamp(min=1.0).item()

    def denoising_losses(self, outputs, denoising, targets):
        """Losses of the denoising queries: each is compared with the box it was made from.

        Args:
            outputs: list over decoder layers of ``(logits [N, D, K], boxes [N, D, 4])``.
            denoising: the dict of ``build_denoising_queries``.
        Returns:
            ``loss_{class,bbox,giou}_dn`` (last layer) and ``..._dn_<i>`` (earlier layers).
        """
        valid, groups, max_boxes = denoising["valid"], denoising["num_groups"], denoising["max_boxes"]
        n = len(targets)
        labels = torch.zeros(n, max_boxes, dtype=torch.int64, device=valid.device)
        boxes = torch.zeros(n, max_boxes, 4, device=valid.device)
        for i, t in enumerate(targets):
            labels[i, : len(t["labels"])], boxes[i, : len(t["labels"])] = t["labels"], t["boxes"]
        labels, boxes = labels.repeat(1, groups)[valid], boxes.repeat(1, groups, 1)[valid]
        norm = self._num_boxes(targets, valid.device) * groups
        losses = {}
        for i, (logits, pred) in enumerate(outputs):
            target_classes = torch.zeros_like(logits[valid], dtype=torch.float32)
            target_classes[torch.arange(len(labels)), labels] = 1.0
            src = pred[valid].float()
            layer = {
                "loss_class": sigmoid_focal_loss(logits[valid].float(), target_classes, self.focal_alpha,
                                                 self.focal_gamma, reduction="sum") / norm,
                "loss_bbox": F.l1_loss(src, boxes, reduction="sum") / norm,
                "loss_giou": (1 - torch.diag(generalized_box_iou(
                    box_convert(src, "cxcywh", "xyxy"), box_convert(boxes, "cxcywh", "xyxy")))).sum() / norm,
            }
            suffix = "_dn" if i == len(outputs) - 1 else f"_dn_{i}"
            losses.update({k + suffix: v * self.weights[k] for k, v in layer.items()})
        return losses

    def forward(self, outputs, targets, enc_outputs=None):
        """
        Args:
            outputs: list over decoder layers of ``(logits [N, Q, K], boxes [N, Q, 4])``, last = final.
            targets: list of N dicts: ``labels`` ``[T_i]`` int64, ``boxes`` ``[T_i, 4]`` normalised cxcywh.
            enc_outputs: optional ``{"pred_logits", "pred_boxes"}`` of the two-stage proposals.
        Returns:
            dict of scalar losses.
        """
        num_boxes = self._num_boxes(targets, outputs[-1][0].device)

        losses = dict(self._losses(*outputs[-1], targets, num_boxes))
        for i, (logits, boxes) in enumerate(outputs[:-1]):
            losses.update({f"{k}_{i}": v for k, v in self._losses(logits, boxes, targets, num_boxes).items()})
        if enc_outputs is not None:
            enc = self._losses(enc_outputs["pred_logits"], enc_outputs["pred_boxes"], targets, num_boxes)
            losses.update({f"{k}_enc": v for k, v in enc.items()})
        return losses
