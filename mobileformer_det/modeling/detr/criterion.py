"""The set loss: sigmoid focal (varifocal, matchability-aware) classification, L1 and GIoU on matched boxes, for every decoder layer."""
import torch
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss, sigmoid_focal_loss


def varifocal_loss(logits, target_scores, alpha=0.75, gamma=2.0):
    """Varifocal loss (VarifocalNet; RT-DETR's IoU-aware classification), element-wise.

    Binary cross-entropy towards ``target_scores`` (the IoU of a matched query's box with its
    target for its class, 0 elsewhere), weighted by ``target_scores`` where they are positive and
    by ``alpha * p ** gamma`` elsewhere.

    Args:
        logits, target_scores: ``[..., K]``.
    Returns:
        ``[..., K]``.
    """
    prob = logits.sigmoid().detach()
    weight = torch.where(target_scores > 0, target_scores, alpha * prob.pow(gamma))
    return F.binary_cross_entropy_with_logits(logits, target_scores, weight=weight, reduction="none")


def matchability_aware_loss(logits, target_scores, gamma=1.5):
    """DEIM's matchability-aware loss (MAL), element-wise.

    Binary cross-entropy towards ``target_scores ** gamma`` (a matched query's IoU with its target,
    for its class) with weight 1 where the targets are positive, and towards 0 with weight
    ``p ** gamma`` elsewhere. Unlike :func:`varifocal_loss`, a positive of low IoU is not
    down-weighted by its IoU: low-quality matches, which dense assignments make common, still teach.

    Args:
        logits, target_scores: ``[..., K]``.
    Returns:
        ``[..., K]``.
    """
    prob = logits.sigmoid().detach()
    positive = target_scores > 0
    weight = torch.where(positive, torch.ones_like(prob), prob.pow(gamma))
    return F.binary_cross_entropy_with_logits(logits, target_scores.pow(gamma), weight=weight, reduction="none")


class SetCriterion(nn.Module):
    """Losses of DETR-style set prediction, one loss function for every set of predictions.

    ``forward`` returns ``loss_class``, ``loss_bbox``, ``loss_giou`` of the last decoder layer, the
    same with suffix ``_<i>`` for each earlier layer, ``_enc`` for the two-stage proposals and
    ``_dn`` / ``_dn_<i>`` for the denoising queries and ``_o2m`` / ``_o2m_<i>`` for the
    one-to-many queries, already multiplied by their weights. Object queries are matched to the
    targets (Hungarian); one-to-many queries to the targets repeated ``one2many_repeats`` times; a
    denoising query's target is the box it was made from. Every loss is normalised by the number
    of target boxes over all workers: one all-reduce per step, run by every worker whatever its
    images hold.

    ``class_loss`` is ``"focal"`` (sigmoid focal loss, Deformable DETR), ``"varifocal"``
    (:func:`varifocal_loss` with ``vfl_alpha``) or ``"mal"`` (:func:`matchability_aware_loss` with
    ``mal_gamma``); with the last two the class target of a matched query is its box's IoU.

    The two-stage proposals are matched one-to-one as the decoder's queries are, or, with a
    ``proposal_assigner`` (:class:`~.assigner.AnchorAssigner`, DETA's first stage, as detrex's DETA
    criterion owns it), every map position's class score is trained against the targets the
    assigner gives its anchor, and its positives' boxes against those targets.
    """

    def __init__(self, num_classes, matcher, weight_class=2.0, weight_bbox=5.0, weight_giou=2.0,
                 focal_alpha=0.25, focal_gamma=2.0, class_loss="focal", vfl_alpha=0.75, mal_gamma=1.5,
                 one2many_repeats=6, proposal_assigner=None):
        super().__init__()
        if class_loss not in ("focal", "varifocal", "mal"):
            raise ValueError(f"MODEL.MF_DETR.LOSS.CLASS_TYPE must be 'focal', 'varifocal' or 'mal', got {class_loss!r}")
        self.proposal_assigner = proposal_assigner
        self.num_classes, self.matcher = num_classes, matcher
        self.weights = {"loss_class": weight_class, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.class_loss, self.vfl_alpha, self.mal_gamma = class_loss, vfl_alpha, mal_gamma
        self.one2many_repeats = one2many_repeats

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

        src = boxes[batch_idx, query_idx].float()
        target_classes = torch.zeros_like(logits, dtype=torch.float32)
        if self.class_loss == "focal":
            target_classes[batch_idx, query_idx, matched_labels] = 1.0
            loss_class = sigmoid_focal_loss(logits.float(), target_classes, self.focal_alpha, self.focal_gamma,
                                            reduction="none")
        else:
            iou = box_iou(box_convert(src.detach(), "cxcywh", "xyxy"), box_convert(matched_boxes, "cxcywh", "xyxy"))
            target_classes[batch_idx, query_idx, matched_labels] = iou.diagonal().clamp(min=1e-6)
            loss_class = (varifocal_loss(logits.float(), target_classes, self.vfl_alpha, self.focal_gamma)
                          if self.class_loss == "varifocal" else
                          matchability_aware_loss(logits.float(), target_classes, self.mal_gamma))
        if query_mask is not None:
            loss_class = loss_class * query_mask[..., None]
        losses = {
            "loss_class": loss_class.sum() / normaliser,
            "loss_bbox": F.l1_loss(src, matched_boxes, reduction="sum") / normaliser,
            "loss_giou": generalized_box_iou_loss(box_convert(src, "cxcywh", "xyxy"),
                                                  box_convert(matched_boxes, "cxcywh", "xyxy"), reduction="sum") / normaliser,
        }
        return {k: v * self.weights[k] for k, v in losses.items()}

    def loss_dense(self, dense, targets, normaliser):
        """:meth:`loss_set` of every map position (a ``DenseProposals``), the ``proposal_assigner``'s
        positives as matches and the positions it counts in the class loss."""
        assignments = self.proposal_assigner(dense.anchors, dense.valid, targets)
        batch = torch.cat([torch.full_like(p, i) for i, (p, _, _) in enumerate(assignments)])
        positions = torch.cat([p for p, _, _ in assignments])
        # every position's row, as loss_set takes them; only the positives' are computed and read
        boxes = dense.anchors.new_zeros(*dense.anchors.shape[:2], 4).index_put((batch, positions),
                                                                               dense.boxes(batch, positions))
        return self.loss_set(dense.logits, boxes, targets, [(p, gt) for p, gt, _ in assignments], normaliser,
                             torch.stack([c for _, _, c in assignments]))

    def forward(self, outputs, targets, enc_outputs=None, denoising=None, num_one2many=0):
        """
        Args:
            outputs: list over decoder layers of ``(logits [N, D+Q+Q2, K], boxes [N, D+Q+Q2, 4])``,
                last = final; the first D queries are the denoising ones (D = 0 without
                ``denoising``), the last Q2 = ``num_one2many`` the one-to-many ones.
            targets: list of N dicts: ``labels`` ``[T_i]`` int64, ``boxes`` ``[T_i, 4]`` normalised cxcywh.
            enc_outputs: optional ``{"pred_logits", "pred_boxes", "dense"}`` of the two-stage
                proposals: the chosen ones (matched one-to-one), and every position's
                (``DenseProposals``, read with a ``proposal_assigner``: its positives are the
                matches and only the positions it counts are in the class loss).
            denoising: optional dict of ``build_denoising_queries``.
        Returns:
            dict of scalar losses.
        """
        num_dn = 0 if denoising is None else denoising["query"].shape[1]
        end = outputs[-1][0].shape[1] - num_one2many
        num_boxes = self.num_boxes(targets, outputs[-1][0].device)
        last = len(outputs) - 1
        sets = {("" if i == last else f"_{i}"): (logits[:, num_dn:end], boxes[:, num_dn:end])
                for i, (logits, boxes) in enumerate(outputs)}
        losses = {}
        if enc_outputs is not None and self.proposal_assigner is not None:
            losses.update({k + "_enc": v for k, v in self.loss_dense(enc_outputs["dense"], targets, num_boxes).items()})
        elif enc_outputs is not None:
            sets["_enc"] = (enc_outputs["pred_logits"], enc_outputs["pred_boxes"])
        for (suffix, (logits, boxes)), indices in zip(sets.items(), self.matcher(list(sets.values()), targets)):
            losses.update({k + suffix: v for k, v in self.loss_set(logits, boxes, targets, indices, num_boxes).items()})
        if num_one2many:
            # H-DETR: every target repeated, matched one-to-one to the extra queries (a second host copy)
            repeated = [{k: v.repeat(self.one2many_repeats, *[1] * (v.dim() - 1)) for k, v in t.items()} for t in targets]
            o2m = {("_o2m" if i == last else f"_o2m_{i}"): (logits[:, end:], boxes[:, end:])
                   for i, (logits, boxes) in enumerate(outputs)}
            for (suffix, (logits, boxes)), indices in zip(o2m.items(), self.matcher(list(o2m.values()), repeated)):
                layer = self.loss_set(logits, boxes, repeated, indices, num_boxes * self.one2many_repeats)
                losses.update({k + suffix: v for k, v in layer.items()})
        if denoising is not None:
            normaliser = num_boxes * max(denoising["num_groups"], 1)
            for i, (logits, boxes) in enumerate(outputs):
                suffix = "_dn" if i == last else f"_dn_{i}"
                layer = self.loss_set(logits[:, :num_dn], boxes[:, :num_dn], targets, denoising["indices"],
                                      normaliser, denoising["valid"])
                losses.update({k + suffix: v for k, v in layer.items()})
        return losses
