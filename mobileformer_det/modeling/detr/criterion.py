"""The set loss: sigmoid focal (varifocal, matchability-aware) classification, L1 and GIoU on matched boxes, for every decoder layer."""
import torch
import torch.nn.functional as F
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from .distribution import decoupled_distillation_loss, fine_grained_localization_loss


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

    With D-FINE's distribution refinement (the transformer's ``distributions``), as D-FINE trains it:
    the first layer's anchor boxes are a set of their own (``_pre``, ``_pre_dn``), every layer's
    matched edge distributions get the FGL loss (``loss_fgl``, weight ``fgl_weight``) and every
    layer but the last the object queries' DDF loss towards the last layer's (``loss_ddf``, weight
    ``ddf_weight``, 0 = off). D-FINE also distils into the denoising queries and matches the
    localisation losses to the union of all layers' matches; here each layer uses its own. The
    one-to-many queries keep the class and box losses only.
    """

    def __init__(self, num_classes, matcher, weight_class=2.0, weight_bbox=5.0, weight_giou=2.0,
                 focal_alpha=0.25, focal_gamma=2.0, class_loss="focal", vfl_alpha=0.75, mal_gamma=1.5,
                 one2many_repeats=6, proposal_assigner=None, fgl_weight=0.15, ddf_weight=1.5, ddf_temperature=5.0):
        super().__init__()
        self.fgl_weight, self.ddf_weight, self.ddf_temperature = fgl_weight, ddf_weight, ddf_temperature
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
        batch_idx, query_idx, matched_labels, matched_boxes = self._matched(targets, indices, logits.device)
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

    @staticmethod
    def _matched(targets, indices, device):
        """Batch and query indices ``[T]`` of the matches, their targets' labels ``[T]`` and boxes ``[T, 4]``."""
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([q for q, _ in indices]).to(device)
        labels = torch.cat([t["labels"][j.to(device)] for t, (_, j) in zip(targets, indices)])
        boxes = torch.cat([t["boxes"][j.to(device)] for t, (_, j) in zip(targets, indices)]).float()
        return batch_idx, query_idx, labels, boxes

    def loss_distributions(self, outputs, corners, anchors, distributions, targets, indices, normaliser, distil):
        """FGL of every layer and, if ``distil``, DDF of every layer but the last (weighted).

        Args:
            outputs: the layers' ``(logits [N, Q, K], boxes [N, Q, 4])``; corners: the layers'
                ``[N, Q, 4 * (R + 1)]``; anchors ``[N, Q, 4]``; all of one set of queries.
            distributions: the transformer's dict (its ``project`` and ``reg_scale``).
            indices: per layer, the matches of :meth:`loss_set`.
        Returns:
            list over the layers of dicts ``{"loss_fgl"[, "loss_ddf"]}``.
        """
        project, reg_scale = distributions["project"], distributions["reg_scale"]
        losses = []
        for i, ((_, boxes), layer_corners, layer_indices) in enumerate(zip(outputs, corners, indices)):
            b, q, _, target_boxes = self._matched(targets, layer_indices, boxes.device)
            layer = {"loss_fgl": self.fgl_weight / normaliser * fine_grained_localization_loss(
                layer_corners[b, q], boxes[b, q], anchors[b, q], target_boxes, project, reg_scale)}
            if distil and self.ddf_weight and i < len(outputs) - 1:
                layer["loss_ddf"] = self.ddf_weight * decoupled_distillation_loss(
                    layer_corners, corners[-1], outputs[-1][0], (b, q), boxes[b, q], target_boxes, self.ddf_temperature)
            losses.append(layer)
        return losses

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

    def forward(self, outputs, targets, enc_outputs=None, denoising=None, num_one2many=0, distributions=None):
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
            distributions: optional dict of the transformer's distribution refinement (its
                ``initial`` and ``anchors`` ``[N, D+Q+Q2, 4]``, ``corners`` per layer, ``project``, ``reg_scale``).
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
        if distributions is not None:
            sets["_pre"] = (outputs[0][0][:, num_dn:end], distributions["initial"][:, num_dn:end])
        matches = dict(zip(sets, self.matcher(list(sets.values()), targets)))
        for suffix, (logits, boxes) in sets.items():
            losses.update({k + suffix: v for k, v in self.loss_set(logits, boxes, targets, matches[suffix], num_boxes).items()})
        suffixes = ["" if i == last else f"_{i}" for i in range(len(outputs))]
        if distributions is not None:
            layers = self.loss_distributions(
                [sets[k] for k in suffixes], [c[:, num_dn:end] for c in distributions["corners"]],
                distributions["anchors"][:, num_dn:end], distributions, targets, [matches[k] for k in suffixes],
                num_boxes, distil=True)
            for suffix, layer in zip(suffixes, layers):
                losses.update({k + suffix: v for k, v in layer.items()})
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
            dn_sets = {("_dn" if i == last else f"_dn_{i}"): (logits[:, :num_dn], boxes[:, :num_dn])
                       for i, (logits, boxes) in enumerate(outputs)}
            if distributions is not None:
                dn_sets["_pre_dn"] = (outputs[0][0][:, :num_dn], distributions["initial"][:, :num_dn])
            for suffix, (logits, boxes) in dn_sets.items():
                layer = self.loss_set(logits, boxes, targets, denoising["indices"], normaliser, denoising["valid"])
                losses.update({k + suffix: v for k, v in layer.items()})
            if distributions is not None:
                layers = self.loss_distributions(
                    list(dn_sets.values())[: len(outputs)], [c[:, :num_dn] for c in distributions["corners"]],
                    distributions["anchors"][:, :num_dn], distributions, targets,
                    [denoising["indices"]] * len(outputs), normaliser, distil=False)
                for suffix, layer in zip(dn_sets, layers):
                    losses.update({k + suffix: v for k, v in layer.items()})
        return losses
