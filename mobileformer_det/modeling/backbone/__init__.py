from .classifier import MobileFormerClassifier, mobile_former_classifier
from .mobile_former import VARIANTS, MobileFormer, MobileFormerSpec, build_mobileformer_backbone
