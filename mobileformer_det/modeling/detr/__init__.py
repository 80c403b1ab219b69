from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .mf_detr import MFDETR
