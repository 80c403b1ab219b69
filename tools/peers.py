"""Today's small detectors, built from the field's libraries for ``benchmark.py --task peers``:
D-FINE, RT-DETRv2, Deformable DETR and DETR from Hugging Face ``transformers`` (Apache-2.0) with
the published models' configurations, and torchvision's SSDLite and Faster R-CNN. Random weights
(nothing is downloaded), made distinct as ``benchmark.build_eval_model`` makes MF-DETR's.

Each builder returns ``(module, exportable)``: ``module(images [N, 3, H, W] float32 RGB 0-255)``
runs the detector's network (the ImageNet normalisation inside, as MF-DETR's graph has it);
``exportable`` says whether its graph is fixed-size (torchvision's detectors keep NMS and
data-dependent shapes in theirs: eager only).

:class:`DFineDetector` puts D-FINE behind Detectron2's model interface, so that
``compare_learning.py`` trains and evaluates it with MF-DETR's trainer, data and evaluator.
"""
import torch
from detectron2.modeling import META_ARCH_REGISTRY, detector_postprocess
from detectron2.structures import ImageList
from torch import nn
from torchvision.ops import box_convert

from mobileformer_det.modeling.detr.postprocess import PostProcess

# Published COCO AP (val2017) and parameter counts (M) of the configurations built here.
PUBLISHED = {
    "D-FINE-N": (42.8, 4), "D-FINE-S": (48.5, 10), "RT-DETRv2-R18": (47.9, 20),
    "Deformable DETR-R50": (43.8, 40), "DETR-R50": (42.0, 41),
    "SSDLite320-MobileNetV3": (21.3, 3.4), "FRCNN-MobileNetV3-FPN": (32.8, 19.4),
}
MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


class _Normalised(nn.Module):
    """``detector(pixel_values=normalised images)`` -> ``(logits [N, Q, K], boxes [N, Q, 4])``."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), False)

    def forward(self, images):
        out = self.detector(pixel_values=(images - self.mean) / self.std)
        return out.logits, out.pred_boxes


class _TorchvisionDetector(nn.Module):
    """A torchvision detector on a batch tensor (it normalises and resizes inside)."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, images):
        return self.detector(list(images / 255.0))


def _d_fine(size, num_labels=80, num_queries=300):
    from transformers import DFineConfig, DFineForObjectDetection

    config = DFineConfig(num_labels=num_labels, num_queries=num_queries)
    b = config.backbone_config
    b.stem_channels = [3, 16, 16]
    b.stage_in_channels, b.stage_mid_channels = [16, 64, 256, 512], [16, 32, 64, 128]
    b.stage_out_channels, b.stage_num_blocks = [64, 256, 512, 1024], [1, 1, 2, 1]
    b.stage_downsample, b.stage_light_block = [False, True, True, True], [False, False, True, True]
    b.stage_kernel_size, b.stage_numb_of_layers = [3, 3, 5, 5], [3, 3, 3, 3]
    b.hidden_sizes, b.use_learnable_affine_block = [128, 256, 512, 1024], True
    config.decoder_layers = 3
    if size == "N":  # HGNetV2-B0, 2 levels (strides 16, 32), width 128
        b.out_indices = [3, 4]
        config.num_feature_levels, config.feat_strides = 2, [16, 32]
        config.encoder_in_channels, config.encode_proj_layers = [512, 1024], [1]
        config.d_model = config.encoder_hidden_dim = 128
        config.encoder_ffn_dim = config.decoder_ffn_dim = 512
        config.decoder_in_channels, config.decoder_n_points = [128, 128], [6, 6]
        config.depth_mult, config.hidden_expansion = 0.5, 0.34
    else:  # S: HGNetV2-B0, 3 levels, width 256
        config.encoder_in_channels, config.decoder_n_points = [256, 512, 1024], [3, 6, 3]
        config.depth_mult, config.hidden_expansion = 0.34, 0.5
    return DFineForObjectDetection(config)


def _rt_detr_v2_r18():
    from transformers import RTDetrV2Config, RTDetrV2ForObjectDetection

    config = RTDetrV2Config(num_labels=80)
    b = config.backbone_config
    b.hidden_sizes, b.depths, b.layer_type = [64, 128, 256, 512], [2, 2, 2, 2], "basic"
    config.encoder_in_channels, config.hidden_expansion, config.decoder_layers = [128, 256, 512], 0.5, 3
    return RTDetrV2ForObjectDetection(config)


def _resnet50(out_features):
    from transformers import ResNetConfig

    return ResNetConfig(out_features=out_features)  # ResNet-50 (bottleneck, depths 3-4-6-3)


def _deformable_detr():
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    config = DeformableDetrConfig(num_labels=91, use_timm_backbone=False, use_pretrained_backbone=False,
                                  backbone_config=_resnet50(["stage2", "stage3", "stage4"]), backbone=None)
    return DeformableDetrForObjectDetection(config)


def _detr():
    from transformers import DetrConfig, DetrForObjectDetection

    config = DetrConfig(num_labels=91, use_timm_backbone=False, use_pretrained_backbone=False,
                        backbone_config=_resnet50(["stage4"]), backbone=None)
    return DetrForObjectDetection(config)


def _torchvision(name):
    import torchvision

    if name == "SSDLite320-MobileNetV3":
        return torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)


BUILDERS = {
    "D-FINE-N": lambda: (_Normalised(_d_fine("N")), True),
    "D-FINE-S": lambda: (_Normalised(_d_fine("S")), True),
    "RT-DETRv2-R18": lambda: (_Normalised(_rt_detr_v2_r18()), True),
    "Deformable DETR-R50": lambda: (_Normalised(_deformable_detr()), True),
    "DETR-R50": lambda: (_Normalised(_detr()), True),
    "SSDLite320-MobileNetV3": lambda: (_TorchvisionDetector(_torchvision("SSDLite320-MobileNetV3")), False),
    "FRCNN-MobileNetV3-FPN": lambda: (_TorchvisionDetector(_torchvision("FRCNN-MobileNetV3-FPN")), False),
}


def build_peer(name, seed=0):
    """``(module in eval mode, exportable)`` of the peer ``name`` (a key of :data:`BUILDERS`), every
    parameter with independent noise (std 1e-3) so that no two weight tensors are equal."""
    module, exportable = BUILDERS[name]()
    module.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=generator).to(p))
    return module, exportable


@META_ARCH_REGISTRY.register()
class DFineDetector(nn.Module):
    """D-FINE-N (transformers' ``DFineForObjectDetection``, random init) as a Detectron2 meta
    architecture: trained with its own losses (VFL, L1, GIoU, FGL, DDF; its denoising queries) and
    post-processed by MF-DETR's :class:`PostProcess` (top-k of the sigmoid scores, the same
    ``MODEL.MF_DETR.TEST`` threshold and NMS).

    Reads ``MODEL.MF_DETR.NUM_CLASSES`` and ``NUM_QUERIES`` (D-FINE's 300 queries need 300 map
    positions at strides 16 and 32, more than small images have). Images go in as D-FINE takes
    them: RGB scaled to [0, 1], no mean or std, zero-padded at the bottom and right to a multiple
    of 32 (D-FINE has no padding mask; its boxes are relative to the padded tensor).
    """

    size_divisibility = 32

    def __init__(self, cfg):
        super().__init__()
        if cfg.INPUT.FORMAT != "RGB":
            raise ValueError(f"D-FINE takes RGB images: set INPUT.FORMAT RGB, got {cfg.INPUT.FORMAT!r}")
        self.detector = _d_fine("N", cfg.MODEL.MF_DETR.NUM_CLASSES, cfg.MODEL.MF_DETR.NUM_QUERIES)
        self.postprocess = PostProcess.from_config(cfg)

    @property
    def device(self):
        return next(self.detector.parameters()).device

    def forward(self, batched_inputs):
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
