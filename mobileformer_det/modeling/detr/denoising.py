"""Denoising queries (DN-DETR): noised copies of the ground truth that the decoder learns to repair.

During training, ``num_groups`` noised copies of every ground-truth box (centre shifted and size
scaled by up to ``box_noise`` of its size, label replaced by a random one with probability
``label_noise``) enter the decoder before the object queries. Their targets are known, so they
get a loss without matching; this stabilises the early bipartite matching and speeds up
convergence. An attention mask keeps the object queries from seeing them, each group from
seeing the others, and every query from seeing the padding slots of images with fewer boxes
than the batch's largest count.

With ``negatives`` (DINO's contrastive denoising), every group also holds a second copy of the
boxes noised further, between ``box_noise`` and twice that: their target is "no object" (class
loss only), which teaches the decoder to reject a query near, but not on, an object.
"""
import torch
from torchvision.ops import box_convert


def build_denoising_queries(targets, num_classes, total, label_noise, box_noise, num_queries, label_embed,
                            negatives=False):
    """
    Args:
        targets: list of N dicts with ``labels`` ``[T_i]`` and ``boxes`` ``[T_i, 4]`` normalised cxcywh.
        total: about how many denoising queries per image (groups = total // max T_i, at least 1;
            total // (2 max T_i) with ``negatives``).
        num_queries: object queries that follow the denoising ones in the decoder.
        label_embed: ``nn.Embedding(num_classes, dim)`` giving the content of a denoising query.
    Returns:
        a dict: ``query`` ``[N, D, dim]``, ``reference`` ``[N, D, 4]`` (sigmoid space), ``attn_mask``
        ``[N, D+Q, D+Q]`` bool (True = blocked), ``num_groups``, ``max_boxes``, ``valid`` ``[N, D]``
        bool (slots holding a real box, negative copies included: the queries that count in the
        class loss) and ``indices`` (per image, the ``(slot, target)`` pairs of the positive slots
        as int64 CPU tensors). D = num_groups * max_boxes (twice that with ``negatives``) is 0
        when no image has a box: the batch still
        goes through the same computation (label_embed stays in the graph, as
        DistributedDataParallel requires).
    """
    counts = [len(t["labels"]) for t in targets]
    max_boxes = max(counts)
    copies = 2 if negatives else 1                                          # positive (+ negative) copies
    group_size = copies * max_boxes
    groups = max(1, total // group_size) if max_boxes else 0
    n, device = len(targets), label_embed.weight.device
    labels = torch.zeros(n, max_boxes, dtype=torch.int64, device=device)
    boxes = torch.full((n, max_boxes, 4), 0.5, device=device)
    for i, t in enumerate(targets):
        labels[i, : counts[i]], boxes[i, : counts[i]] = t["labels"], t["boxes"]
    labels, boxes = labels.repeat(1, copies * groups), boxes.repeat(1, copies * groups, 1)
    slot = torch.arange(max_boxes).repeat(copies * groups)                      # box index of each slot
    positive = (torch.arange(group_size) < max_boxes).repeat(groups)           # [D], on the host
    valid = slot[None] < torch.tensor(counts)[:, None]                          # [N, D], on the host

    flip = torch.rand(labels.shape, device=device) < label_noise
    labels = torch.where(flip, torch.randint_like(labels, num_classes), labels)
    if box_noise > 0:
        xyxy = box_convert(boxes, "cxcywh", "xyxy")
        half_wh = boxes[..., 2:].repeat(1, 1, 2) / 2
        offset = torch.rand_like(xyxy) * 2 - 1                                  # |offset| < 1: positives
        if negatives:                                                           # 1 <= |offset| < 2
            offset = offset + offset.sign() * (~positive).to(device, xyxy.dtype)[None, :, None]
        xyxy = xyxy + offset * half_wh * box_noise
        boxes = box_convert(xyxy.clamp(0, 1), "xyxy", "cxcywh").clamp(min=1e-4)

    size = groups * group_size
    mask = torch.zeros(size + num_queries, size + num_queries, dtype=torch.bool)
    mask[size:, :size] = True                                                # queries never see DN
    for g in range(groups):
        block = slice(g * group_size, (g + 1) * group_size)
        mask[block, :size] = True
        mask[block, block] = False                                           # a group sees itself only
    # Padding slots are seen by no other query; each sees itself, so that no row is all blocked.
    padding = torch.cat([~valid, torch.zeros(n, num_queries, dtype=torch.bool)], 1)   # [N, D+Q]
    mask = (mask[None] | padding[:, None, :]) & ~torch.eye(size + num_queries, dtype=torch.bool)
    indices = [(torch.nonzero(v & positive).flatten(), slot[v & positive]) for v in valid]
    return {"query": label_embed(labels), "reference": boxes.clamp(1e-4, 1 - 1e-4), "attn_mask": mask.to(device),
            "num_groups": groups, "max_boxes": max_boxes, "valid": valid.to(device), "indices": indices}
