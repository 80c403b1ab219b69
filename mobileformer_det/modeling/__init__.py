from .backbone import (
    VARIANTS,
    MobileFormer,
    MobileFormerClassifier,
    MobileFormerSpec,
    build_mobileformer_backbone,
    mobile_former_classifier,
)
from .detr import MFDETR
from .peers import PeerDETR
