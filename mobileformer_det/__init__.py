"""Mobile-Former (CVPR 2022) as a Detectron2 backbone, and MF-DETR, a DETR-style detector on it.

Importing this package registers ``build_mobileformer_backbone`` and, for Detectron2's RetinaNet
and Faster R-CNN, ``build_retinanet_mobileformer_fpn_backbone`` and
``build_mobileformer_fpn_backbone`` in Detectron2's ``BACKBONE_REGISTRY``, and ``MFDETR`` and ``PeerDETR`` (today's DETRs from ``transformers``, the
``bench`` extra, for comparisons) in ``META_ARCH_REGISTRY``.
"""
from . import modeling
from .config import add_mobileformer_config, setup_cfg

__version__ = "0.2.0"
