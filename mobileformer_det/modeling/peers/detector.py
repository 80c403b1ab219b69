"""Today's DETRs behind Detectron2's model interface, so that this project's trainer, data and
evaluator train and evaluate them exactly as they do MF-DETR."""
import torch
from detectron2.modeling import META_ARCH_REGISTRY, detector_postprocess
from detectron2.structures import ImageList
from torch import nn
from torchvision.ops import box_convert

from ..detr.postprocess import PostProcess
from .zoo import PEERS, build_network

__all__ = ["PeerDETR"]


@META_ARCH_REGISTRY.register()
class PeerDETR(nn.Module):
    """A DETR of ``transformers`` (``MODEL.PEER.NAME``: D-FINE-N, DEIMv2-Atto, -Femto, -Pico, -N;
    :data:`~mobileformer_det.modeling.peers.PEERS`), random init, its backbone's batch norms
    trained as its recipe trains them, as a Detectron2 meta architecture. Trained with its own
    losses (and its denoising queries); detections from MF-DETR's :class:`PostProcess` (top-k of
    the sigmoid scores, the ``MODEL.MF_DETR.TEST`` threshold and NMS).

    Reads ``MODEL.MF_DETR.NUM_CLASSES`` and ``NUM_QUERIES``, the dataset-facing keys it shares with
    MF-DETR (the published models' 100-300 queries need as many map positions at strides 16 and
    32, more than small images have). Its own optimiser: ``recipe_overrides(name)``. Images go in
    as these models take them: RGB scaled to [0, 1], no mean or std, zero-padded at the bottom and
    right to a multiple of 32 (they have no padding mask; their boxes are relative to the padded
    tensor).
    """

    size_divisibility = 32

    def __init__(self, cfg):
        super().__init__()
        name = cfg.MODEL.PEER.NAME
        trainable = [n for n, p in PEERS.items() if p.trainable]
        if name not in trainable:
            raise ValueError(f"MODEL.PEER.NAME must be one of {trainable}, got {name!r}")
        if cfg.INPUT.FORMAT != "RGB":
            raise ValueError(f"{name} takes RGB images: set INPUT.FORMAT RGB, got {cfg.INPUT.FORMAT!r}")
        try:
            self.detector = build_network(name, cfg.MODEL.MF_DETR.NUM_CLASSES, cfg.MODEL.MF_DETR.NUM_QUERIES)
        except ImportError as e:
            raise ImportError(f"{name} is built by Hugging Face transformers: pip install -e '.[bench]' ({e})") from e
        self.postprocess = PostProcess.from_config(cfg)

    @property
    def device(self):
        return next(self.detector.parameters()).device

    @property
    def backbone(self):
        """The HGNetV2 (what the recipes' ``backbone`` learning rate applies to; D-FINE's input
        projections belong to its encoder)."""
        model = self.detector.model
        return (model.backbone if hasattr(model, "backbone") else model.conv_encoder).model

    def forward(self, batched_inputs):
        """Detectron2's interface: training returns the peer's weighted loss terms, inference a list
        of ``{"instances": Instances}`` at each input's ``height`` x ``width``."""
        images = ImageList.from_tensors([x["image"].to(self.device).float() / 255.0 for x in batched_inputs],
                                        self.size_divisibility)
        h, w = images.tensor.shape[-2:]
        if self.training:
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            labels = [{"class_labels": inst.gt_classes.to(self.device),
                       "boxes": box_convert(inst.gt_boxes.tensor.to(self.device) / scale, "xyxy", "cxcywh")}
                      for inst in (x["instances"] for x in batched_inputs)]
            return dict(self.detector(pixel_values=images.tensor, labels=labels).loss_dict)
        out = self.detector(pixel_values=images.tensor)
        padded = torch.tensor([[h, w]], dtype=torch.float32, device=self.device).expand(len(batched_inputs), 2)
        boxes, scores, labels = self.postprocess(out.logits, out.pred_boxes, padded)
        return [{"instances": detector_postprocess(self.postprocess.select(b, s, l, size),
                                                   x.get("height", size[0]), x.get("width", size[1]))}
                for b, s, l, x, size in zip(boxes, scores, labels, batched_inputs, images.image_sizes)]
