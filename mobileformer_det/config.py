from detectron2.config import CfgNode as CN


def add_mobileformer_config(cfg):
    """Add every config key of this project to ``cfg`` with its default."""
    cfg.MODEL.MOBILEFORMER = CN()
    # One of mf26 mf52 mf96 mf151 mf214 mf294 mf508 (the paper's FLOPs at 224x224).
    cfg.MODEL.MOBILEFORMER.VARIANT = "mf294"
    # Feature maps handed to the detector, among res2..res5 (strides 4..32).
    cfg.MODEL.MOBILEFORMER.OUT_FEATURES = ["res3", "res4", "res5"]
    # Normalisation of the convolutions: BN, FrozenBN or SyncBN.
    cfg.MODEL.MOBILEFORMER.NORM = "BN"
    # 0: train all; 1: freeze stem + tokens; k >= 2: also res2..res<k>.
    cfg.MODEL.MOBILEFORMER.FREEZE_AT = 0
    # Largest stochastic-depth rate (linear over blocks, as in the reference).
    cfg.MODEL.MOBILEFORMER.DROP_PATH_RATE = 0.0
