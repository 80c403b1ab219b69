"""The one post-processing of MF-DETR's outputs, for evaluation, the demo, the predictor and the
exported graph alike (DETR's ``PostProcess``)."""
import torch
from detectron2.structures import Boxes, Instances
from torch import nn
from torchvision.ops import batched_nms, box_convert

__all__ = ["PostProcess", "top_detections"]


def top_detections(logits, boxes, k):
    """The ``k`` best (query, class) pairs of each image (sigmoid scores, as in Deformable DETR).

    Args:
        logits: ``[N, Q, K]``; boxes: ``[N, Q, 4]`` normalised cxcywh.
    Returns:
        scores ``[N, k']`` (descending), labels ``[N, k']`` int64, boxes ``[N, k', 4]`` normalised
        xyxy, with ``k' = min(k, Q * K)``.
    """
    num_classes = logits.shape[-1]
    prob = logits.float().sigmoid().flatten(1)                                    # [N, Q*K]
    scores, index = prob.topk(min(k, prob.shape[1]), dim=1)
    query = torch.div(index, num_classes, rounding_mode="floor")
    boxes = torch.gather(boxes.float(), 1, query[..., None].expand(-1, -1, 4))
    return scores, index % num_classes, box_convert(boxes, "cxcywh", "xyxy")


class PostProcess(nn.Module):
    """Final-layer outputs to detections, in two steps.

    ``forward`` (fixed shapes; it is in the exported graph): the top-k (query, class) pairs
    (:func:`top_detections`), their boxes scaled to each image's size and clipped to it.
    :meth:`select` (one image, variable length; outside the graph): the score threshold, then
    class-wise NMS.

    Args:
        topk: detections kept per image (``MODEL.MF_DETR.TEST.TOPK``).
        score_thresh: minimum score (``MODEL.MF_DETR.TEST.SCORE_THRESH``).
        nms_thresh: class-wise NMS at this IoU, off when <= 0 (``MODEL.MF_DETR.TEST.NMS_THRESH``).
            A set-prediction decoder trained to the end emits one box per object; one trained
            briefly still emits duplicates, which cost AP50.
    """

    def __init__(self, topk=100, score_thresh=0.0, nms_thresh=0.0):
        super().__init__()
        self.topk, self.score_thresh, self.nms_thresh = topk, score_thresh, nms_thresh

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.MF_DETR.TEST
        return cls(c.TOPK, c.SCORE_THRESH, c.NMS_THRESH)

    def forward(self, logits, boxes, image_sizes):
        """
        Args:
            logits: ``[N, Q, K]``; boxes: ``[N, Q, 4]`` normalised cxcywh.
            image_sizes: ``[N, 2]`` float (h, w) of each image in pixels (the valid part of a padded one).
        Returns:
            boxes ``[N, k, 4]`` xyxy in pixels, clipped to the image; scores ``[N, k]``
            (descending); labels ``[N, k]`` int64 (contiguous class index).
        """
        scores, labels, boxes = top_detections(logits, boxes, self.topk)
        bound = image_sizes.to(boxes.dtype)[:, None, [1, 0, 1, 0]]                   # [N, 1, 4] (w, h, w, h)
        return torch.minimum((boxes * bound).clamp(min=0), bound), scores, labels

    def select(self, boxes, scores, labels, image_size):
        """One image's detections above the score threshold, after NMS, as ``Instances``.

        Args:
            boxes: ``[k, 4]`` xyxy in pixels; scores, labels: ``[k]``.
            image_size: (h, w), the boxes are clipped to it.
        Returns:
            ``Instances`` with ``pred_boxes``, ``scores``, ``pred_classes``, by descending score.
        """
        keep = scores > self.score_thresh
        result = Instances(tuple(image_size))
        result.pred_boxes = Boxes(boxes[keep])
        result.pred_boxes.clip(tuple(image_size))
        result.scores = scores[keep]
        result.pred_classes = labels[keep]
        if self.nms_thresh <= 0:
            return result
        keep = batched_nms(result.pred_boxes.tensor.float(), result.scores.float(), result.pred_classes, self.nms_thresh)
        return result[keep]
