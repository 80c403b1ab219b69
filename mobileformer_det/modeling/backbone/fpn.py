"""Mobile-Former under Detectron2's own FPN, for its RetinaNet and Faster R-CNN (``GeneralizedRCNN``).

The builders mirror ``build_resnet_fpn_backbone`` and ``build_retinanet_resnet_fpn_backbone``:
the same ``FPN``, ``LastLevelMaxPool`` and ``LastLevelP6P7`` of ``detectron2.modeling``, the same
``MODEL.FPN`` keys, with :class:`MobileFormer` as the bottom-up network. Those heads read maps only,
so the backbone drops its token output (:meth:`MobileFormer.drop_token_output`): its final
Mobile->Former is not built, and DistributedDataParallel finds no parameter without a gradient.

Detectron2's meta architectures call the backbone with the padded batch only (no image sizes), so
here, as for ResNet, a padded position is part of the image: the bridges' tokens attend to it.
MF-DETR passes the sizes and is invariant to padding.
"""
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7

from .mobile_former import build_mobileformer_backbone

__all__ = ["build_mobileformer_fpn_backbone", "build_retinanet_mobileformer_fpn_backbone"]


def _bottom_up(cfg, input_shape):
    """Mobile-Former without its tokens, checked to give every map ``MODEL.FPN.IN_FEATURES`` reads."""
    wanted, given = list(cfg.MODEL.FPN.IN_FEATURES), list(cfg.MODEL.MOBILEFORMER.OUT_FEATURES)
    missing = [f for f in wanted if f not in given]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {wanted} reads {missing}, which MODEL.MOBILEFORMER.OUT_FEATURES {given} does "
            f"not give: add them to MODEL.MOBILEFORMER.OUT_FEATURES (or take them out of MODEL.FPN.IN_FEATURES)")
    bottom_up = build_mobileformer_backbone(cfg, input_shape)
    bottom_up.drop_token_output()
    return bottom_up


@BACKBONE_REGISTRY.register()
def build_mobileformer_fpn_backbone(cfg, input_shape):
    """Mobile-Former + FPN with a max-pooled top level, as ``build_resnet_fpn_backbone`` builds it
    for Faster R-CNN: ``res2..res5`` -> ``p2..p6`` (strides 4..64), ``MODEL.FPN.OUT_CHANNELS`` each."""
    return FPN(
        bottom_up=_bottom_up(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_retinanet_mobileformer_fpn_backbone(cfg, input_shape):
    """Mobile-Former + FPN with P6 and P7 made from the coarsest map, as
    ``build_retinanet_resnet_fpn_backbone`` builds it for RetinaNet: ``res3..res5`` -> ``p3..p7``
    (strides 8..128)."""
    bottom_up = _bottom_up(cfg, input_shape)
    coarsest = cfg.MODEL.FPN.IN_FEATURES[-1]
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(bottom_up.output_shape()[coarsest].channels, out_channels, in_feature=coarsest),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
