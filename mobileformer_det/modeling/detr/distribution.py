"""D-FINE's fine-grained distribution refinement (FDR): a box as four edge distances from an anchor
box, each a probability distribution over ``reg_max + 1`` fixed, non-uniformly spaced values, and
its two losses: fine-grained localisation (FGL) and decoupled distillation (DDF, GO-LSD's
self-distillation of the last layer's distributions into the earlier ones)."""
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, box_iou


def weighting_function(reg_max, up, reg_scale):
    """D-FINE's ``W(n)``: the ``reg_max + 1`` values an edge distance's bins stand for, in units of
    the anchor's size over ``reg_scale``: 0 in the middle, growing geometrically to
    ``+-up * reg_scale`` at the second and second-to-last bins, and ``+-2 * up * reg_scale`` at the
    ends (fine steps near the anchor's edges, coarse ones far from them).

    Returns:
        ``[reg_max + 1]`` float tensor, increasing.
    """
    if reg_max < 4 or reg_max % 2:
        raise ValueError(f"MODEL.MF_DETR.DECODER.REG_MAX must be an even number >= 4, got {reg_max}")
    bound = up * reg_scale
    step = (bound + 1) ** (2 / (reg_max - 2))
    half = [step ** i - 1 for i in range(1, reg_max // 2)]
    values = [-2 * bound] + [-v for v in reversed(half)] + [0.0] + half + [2 * bound]
    return torch.tensor(values, dtype=torch.float32)


def integral(corners, project):
    """Expected edge distances of the distributions.

    Args:
        corners: ``[..., 4 * (R + 1)]`` logits of the four edges' distributions (left, top, right, bottom).
        project: ``[R + 1]``, :func:`weighting_function`.
    Returns:
        ``[..., 4]``.
    """
    probs = corners.unflatten(-1, (4, project.numel())).softmax(-1)
    return probs @ project.to(probs.dtype)


def distance_to_box(anchors, distances, reg_scale):
    """Boxes whose edges lie ``distances`` beyond the anchor's half-size, in units of its size over
    ``reg_scale`` (0 gives the anchor itself).

    Args:
        anchors: ``[..., 4]`` cxcywh; distances: ``[..., 4]`` (left, top, right, bottom).
    Returns:
        ``[..., 4]`` cxcywh.
    """
    centre, size = anchors[..., :2], anchors[..., 2:]
    unit = size / reg_scale
    top_left = centre - (0.5 * reg_scale + distances[..., :2]) * unit
    bottom_right = centre + (0.5 * reg_scale + distances[..., 2:]) * unit
    return box_convert(torch.cat([top_left, bottom_right], -1), "xyxy", "cxcywh")


def box_to_bins(anchors, boxes, project, reg_scale):
    """The inverse of :func:`distance_to_box`, as targets over the bins: each edge distance lies
    between two neighbouring values of ``project``; its target puts weight on both, by proximity.
    A distance beyond the ends goes wholly to the end bin.

    Args:
        anchors, boxes: ``[T, 4]`` cxcywh. project: ``[R + 1]``.
    Returns:
        (left bin ``[T, 4]`` int64 in [0, R - 1], weight of the bin to its right ``[T, 4]`` in [0, 1]).
    """
    unit = anchors[:, 2:] / reg_scale + 1e-16
    xyxy = box_convert(boxes, "cxcywh", "xyxy")
    distances = torch.cat([(anchors[:, :2] - xyxy[:, :2]) / unit, (xyxy[:, 2:] - anchors[:, :2]) / unit], -1)
    distances = distances - 0.5 * reg_scale
    r = project.numel() - 1
    left = torch.bucketize(distances, project, right=True) - 1  # the last value <= each distance
    below, above = left < 0, left >= r
    left = left.clamp(0, r - 1)
    lo, hi = project[left], project[left + 1]
    to_lo, to_hi = (distances - lo).abs(), (hi - distances).abs()
    right_weight = to_lo / (to_lo + to_hi)
    right_weight = torch.where(below, 0.0, torch.where(above, 1.0, right_weight))
    return left, right_weight


def fine_grained_localization_loss(corners, boxes, anchors, target_boxes, project, reg_scale):
    """D-FINE's FGL loss of matched queries: cross-entropy of each edge's distribution towards the
    two bins around its target distance (:func:`box_to_bins`, weighted by proximity), weighted by the
    IoU of the query's box with its target. Summed (the caller normalises).

    Args:
        corners: ``[T, 4 * (R + 1)]`` logits; boxes: ``[T, 4]`` the boxes they give (cxcywh);
        anchors: ``[T, 4]`` the anchors they are measured from; target_boxes: ``[T, 4]``.
    Returns:
        scalar.
    """
    left, right_weight = box_to_bins(anchors.detach().float(), target_boxes.float(), project, reg_scale)
    logits = corners.float().unflatten(-1, (4, project.numel())).flatten(0, 1)      # [T * 4, R + 1]
    left, right_weight = left.flatten(), right_weight.flatten()
    loss = (F.cross_entropy(logits, left, reduction="none") * (1 - right_weight)
            + F.cross_entropy(logits, left + 1, reduction="none") * right_weight)
    iou = _matched_iou(boxes, target_boxes)
    return (loss * iou.repeat_interleave(4)).sum()


def decoupled_distillation_loss(corners, teacher_corners, teacher_logits, matched, boxes, target_boxes,
                                temperature=5.0):
    """D-FINE's DDF loss (GO-LSD): KL divergence of a layer's edge distributions from the last
    layer's (the teacher, detached), at temperature ``temperature``, weighted per query by the IoU
    of its box with its target where it is matched and by the teacher's best class probability
    elsewhere; the mean over the matched and the mean over the others, weighted by the square roots
    of their counts.

    Args:
        corners, teacher_corners: ``[N, Q, 4 * (R + 1)]``; teacher_logits: ``[N, Q, K]``.
        matched: (batch index ``[T]``, query index ``[T]``) of the matched queries;
        boxes, target_boxes: ``[T, 4]`` the matched queries' boxes and their targets.
    Returns:
        scalar.
    """
    bins = corners.shape[-1] // 4
    student = F.log_softmax(corners.float().unflatten(-1, (4, bins)) / temperature, -1)
    teacher = F.softmax(teacher_corners.detach().float().unflatten(-1, (4, bins)) / temperature, -1)
    kl = F.kl_div(student, teacher, reduction="none").sum(-1) * temperature ** 2      # [N, Q, 4]
    weight = teacher_logits.detach().float().sigmoid().max(-1)[0]
    is_matched = torch.zeros_like(weight, dtype=torch.bool)
    is_matched[matched] = True
    weight = weight.index_put(matched, _matched_iou(boxes, target_boxes))
    kl = kl * weight[..., None]
    n = corners.shape[0]
    terms = []
    for part in (is_matched, ~is_matched):
        count = part.sum() * 4
        scale = (count / n) ** 0.5
        terms.append((kl[part].sum() / count.clamp(min=1) * scale, scale))
    return sum(t for t, _ in terms) / sum(s for _, s in terms).clamp(min=1e-12)


def _matched_iou(boxes, target_boxes):
    """IoU of each box with its own target (detached), ``[T]``."""
    a = box_convert(boxes.detach().float(), "cxcywh", "xyxy")
    b = box_convert(target_boxes.float(), "cxcywh", "xyxy")
    return box_iou(a, b).diagonal() if len(a) else a.new_zeros(0)
