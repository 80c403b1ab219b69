"""Every config key this project adds to Detectron2's defaults, with its default and meaning, and
the one function that builds a config for the tools and the tests."""
import logging

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.utils import comm

__all__ = ["RENAMED_KEYS", "add_mobileformer_config", "num_classes", "setup_cfg"]

# Old flat MODEL.MF_DETR keys -> their keys in the sub-nodes (version 0.1.0 to 0.2.0).
RENAMED_KEYS = {f"MODEL.MF_DETR.{old}": f"MODEL.MF_DETR.{new}" for old, new in {
    "DEC_LAYERS": "DECODER.NUM_LAYERS", "DIM_FEEDFORWARD": "DECODER.DIM_FEEDFORWARD", "NHEADS": "DECODER.NHEADS",
    "NUM_POINTS": "DECODER.NUM_POINTS", "DROPOUT": "DECODER.DROPOUT", "AUX_LOSS": "DECODER.AUX_LOSS",
    "LOOK_FORWARD_TWICE": "DECODER.LOOK_FORWARD_TWICE",
    "TWO_STAGE": "PROPOSALS.TWO_STAGE", "PROPOSAL_ASSIGN": "PROPOSALS.ASSIGN", "PROPOSAL_NMS_THRESH": "PROPOSALS.NMS_THRESH",
    "DN_NUMBER": "DENOISING.NUM_QUERIES", "DN_LABEL_NOISE": "DENOISING.LABEL_NOISE",
    "DN_BOX_NOISE": "DENOISING.BOX_NOISE", "DN_NEGATIVES": "DENOISING.NEGATIVES",
    "NUM_QUERIES_ONE2MANY": "ONE2MANY.NUM_QUERIES", "ONE2MANY_REPEATS": "ONE2MANY.REPEATS",
    "COST_CLASS": "MATCHER.COST_CLASS", "COST_BBOX": "MATCHER.COST_BBOX", "COST_GIOU": "MATCHER.COST_GIOU",
    "CLASS_LOSS": "LOSS.CLASS_TYPE", "CLASS_WEIGHT": "LOSS.CLASS_WEIGHT", "BBOX_WEIGHT": "LOSS.BBOX_WEIGHT",
    "GIOU_WEIGHT": "LOSS.GIOU_WEIGHT", "FOCAL_ALPHA": "LOSS.FOCAL_ALPHA", "FOCAL_GAMMA": "LOSS.FOCAL_GAMMA",
    "VFL_ALPHA": "LOSS.VFL_ALPHA",
    "TEST_TOPK": "TEST.TOPK", "TEST_SCORE_THRESH": "TEST.SCORE_THRESH", "TEST_NMS_THRESH": "TEST.NMS_THRESH",
}.items()}


def add_mobileformer_config(cfg):
    """Add the keys of the Mobile-Former backbone, MF-DETR, its solver and its data to ``cfg``."""
    cfg.MODEL.MOBILEFORMER = CN()
    # One of mf26 mf52 mf96 mf151 mf214 mf294 mf508 (the paper's FLOPs at 224x224).
    cfg.MODEL.MOBILEFORMER.VARIANT = "mf294"
    # Feature maps handed to the detector, among res2..res5 (strides 4..32).
    cfg.MODEL.MOBILEFORMER.OUT_FEATURES = ["res3", "res4", "res5"]
    # Normalisation of the convolutions: BN, FrozenBN or SyncBN. FrozenBN keeps the statistics of
    # MODEL.WEIGHTS (the COCO recipe's choice); BN learns them per process (with several processes,
    # process 0's are broadcast at every step); SyncBN learns them over all GPUs.
    cfg.MODEL.MOBILEFORMER.NORM = "BN"
    # 0: train all; 1: freeze stem + tokens; k >= 2: also res2..res<k>.
    cfg.MODEL.MOBILEFORMER.FREEZE_AT = 0
    # Largest stochastic-depth rate (linear over blocks, as in the reference).
    cfg.MODEL.MOBILEFORMER.DROP_PATH_RATE = 0.0

    cfg.MODEL.MF_DETR = CN()
    cfg.MODEL.MF_DETR.NUM_CLASSES = 80
    # Object queries.
    cfg.MODEL.MF_DETR.NUM_QUERIES = 100
    # Width of the memory, the queries and the global tokens' projection.
    cfg.MODEL.MF_DETR.HIDDEN_DIM = 256
    # Levels seen by the decoder: the OUT_FEATURES maps, plus stride-2 convs for the rest.
    cfg.MODEL.MF_DETR.NUM_FEATURE_LEVELS = 3
    # Let queries attend to Mobile-Former's global tokens. False builds the decoder layers without
    # that sub-layer (and the backbone without its final Mobile->Former): the ablation.
    cfg.MODEL.MF_DETR.USE_TOKENS = True
    # Deformable encoder layers over the maps (with the decoder's FFN width, heads, points and
    # dropout); 0 = no encoder, which lets inference fold the neck into the decoder.
    cfg.MODEL.MF_DETR.ENC_LAYERS = 0
    # RT-DETR's AIFI: self-attention encoder layers (with the decoder's FFN width, heads and
    # dropout) over the positions of the last map of OUT_FEATURES only (stride 32 with res5), where
    # they are few; 0 = off. Inference still folds the neck into the decoder on the other levels.
    cfg.MODEL.MF_DETR.AIFI_LAYERS = 0

    cfg.MODEL.MF_DETR.DECODER = CN()
    cfg.MODEL.MF_DETR.DECODER.NUM_LAYERS = 6
    cfg.MODEL.MF_DETR.DECODER.DIM_FEEDFORWARD = 1024
    cfg.MODEL.MF_DETR.DECODER.NHEADS = 8
    # Sampling points per head and level of the deformable attention.
    cfg.MODEL.MF_DETR.DECODER.NUM_POINTS = 4
    cfg.MODEL.MF_DETR.DECODER.DROPOUT = 0.0
    # Class and box heads, box refinement and losses on every decoder layer; False: on the last only
    # (the two-stage proposals keep their loss either way).
    cfg.MODEL.MF_DETR.DECODER.AUX_LOSS = True
    # DINO's look-forward-twice box refinement (a layer's boxes keep the previous layer's gradient).
    cfg.MODEL.MF_DETR.DECODER.LOOK_FORWARD_TWICE = False
    # How a layer refines the boxes: "offset" (Deformable DETR: an offset added to the previous boxes)
    # or "distribution" (D-FINE's fine-grained distribution refinement: each edge a distribution over
    # REG_MAX + 1 bins around anchor boxes from the first layer, refined in logit space by every
    # layer; trained with LOSS.FGL_WEIGHT and LOSS.DDF_WEIGHT). REG_SCALE and REG_UP shape the bins
    # (D-FINE's reg_scale and up): edges move up to +-2 * REG_UP * the anchor's size.
    cfg.MODEL.MF_DETR.DECODER.BOX_REFINEMENT = "offset"
    cfg.MODEL.MF_DETR.DECODER.REG_MAX = 32
    cfg.MODEL.MF_DETR.DECODER.REG_SCALE = 4.0
    cfg.MODEL.MF_DETR.DECODER.REG_UP = 0.5

    # The two-stage proposals: the decoder's initial reference boxes.
    cfg.MODEL.MF_DETR.PROPOSALS = CN()
    # From the top-scoring map positions (two-stage) instead of learned ones.
    cfg.MODEL.MF_DETR.PROPOSALS.TWO_STAGE = True
    # How they are trained: "hungarian" (DINO: the chosen ones matched one-to-one) or "anchor_iou"
    # (DETA: every position's anchor box assigned by IoU as in an RPN, at most 4 positives per
    # object, so every position's score learns from every image).
    cfg.MODEL.MF_DETR.PROPOSALS.ASSIGN = "hungarian"
    # Skip proposals that overlap a higher-scoring one by more than this IoU (Fast NMS over the best
    # 4 x NUM_QUERIES positions, training and inference; DETA's partner of "anchor_iou"); 0 = off.
    cfg.MODEL.MF_DETR.PROPOSALS.NMS_THRESH = 0.0

    # Denoising queries (DN-DETR, DINO), training only.
    cfg.MODEL.MF_DETR.DENOISING = CN()
    # Denoising queries per image (about; 0 = off), label flip probability, box noise.
    cfg.MODEL.MF_DETR.DENOISING.NUM_QUERIES = 100
    cfg.MODEL.MF_DETR.DENOISING.LABEL_NOISE = 0.2
    cfg.MODEL.MF_DETR.DENOISING.BOX_NOISE = 0.4
    # DINO's contrastive denoising: each group also holds negative copies (noise between BOX_NOISE
    # and twice that) with a "no object" target.
    cfg.MODEL.MF_DETR.DENOISING.NEGATIVES = False

    # H-DETR's hybrid matching: extra training-only queries matched one-to-many (to the targets
    # repeated REPEATS times); 0 = off. Inference is unchanged.
    cfg.MODEL.MF_DETR.ONE2MANY = CN()
    cfg.MODEL.MF_DETR.ONE2MANY.NUM_QUERIES = 0
    cfg.MODEL.MF_DETR.ONE2MANY.REPEATS = 6

    # Matching costs of the Hungarian matcher (focal class / L1 / GIoU; the focal cost takes
    # LOSS.FOCAL_ALPHA and FOCAL_GAMMA).
    cfg.MODEL.MF_DETR.MATCHER = CN()
    cfg.MODEL.MF_DETR.MATCHER.COST_CLASS = 2.0
    cfg.MODEL.MF_DETR.MATCHER.COST_BBOX = 5.0
    cfg.MODEL.MF_DETR.MATCHER.COST_GIOU = 2.0

    cfg.MODEL.MF_DETR.LOSS = CN()
    # "focal", "varifocal" (IoU-aware class targets, RT-DETR; VFL_ALPHA weighs the negatives) or
    # "mal" (DEIM's matchability-aware loss: targets IoU ** MAL_GAMMA at full weight; DEIM weighs it 1).
    cfg.MODEL.MF_DETR.LOSS.CLASS_TYPE = "focal"
    cfg.MODEL.MF_DETR.LOSS.CLASS_WEIGHT = 2.0
    cfg.MODEL.MF_DETR.LOSS.BBOX_WEIGHT = 5.0
    cfg.MODEL.MF_DETR.LOSS.GIOU_WEIGHT = 2.0
    cfg.MODEL.MF_DETR.LOSS.FOCAL_ALPHA = 0.25
    cfg.MODEL.MF_DETR.LOSS.FOCAL_GAMMA = 2.0
    cfg.MODEL.MF_DETR.LOSS.VFL_ALPHA = 0.75
    cfg.MODEL.MF_DETR.LOSS.MAL_GAMMA = 1.5
    # With DECODER.BOX_REFINEMENT "distribution" (D-FINE's weights): the fine-grained localisation
    # loss of every layer's edge distributions, and the decoupled distillation of the last layer's
    # distributions into the earlier layers' (GO-LSD; 0.0 = off) at temperature DDF_TEMPERATURE.
    cfg.MODEL.MF_DETR.LOSS.FGL_WEIGHT = 0.15
    cfg.MODEL.MF_DETR.LOSS.DDF_WEIGHT = 1.5
    cfg.MODEL.MF_DETR.LOSS.DDF_TEMPERATURE = 5.0

    cfg.MODEL.MF_DETR.TEST = CN()
    # Detections kept per image (top-k over queries x classes) and their minimum score.
    cfg.MODEL.MF_DETR.TEST.TOPK = 100
    cfg.MODEL.MF_DETR.TEST.SCORE_THRESH = 0.0
    # Class-wise NMS on those detections at this IoU; 0 = off (DETR's set prediction needs none once
    # trained to the end; a briefly trained decoder still emits duplicates).
    cfg.MODEL.MF_DETR.TEST.NMS_THRESH = 0.0

    # MODEL.META_ARCHITECTURE "PeerDETR": which of today's DETRs it builds from Hugging Face
    # transformers (pip install -e ".[bench]"), by its published name: D-FINE-N, DEIMv2-Atto,
    # DEIMv2-Femto, DEIMv2-Pico or DEIMv2-N (mobileformer_det/modeling/peers/zoo.py). It shares
    # MODEL.MF_DETR.NUM_CLASSES, NUM_QUERIES and TEST with MF-DETR; recipe_overrides(name) gives
    # its own optimiser.
    cfg.MODEL.PEER = CN()
    cfg.MODEL.PEER.NAME = "D-FINE-N"

    # The flat keys of earlier versions: merging one stops with an error naming its new key.
    for old, new in RENAMED_KEYS.items():
        cfg.register_renamed_key(old, new)

    # An exponential moving average of the weights (D-FINE's, DEIM's, RT-DETR's ModelEMA): evaluated
    # during training, saved in each checkpoint under "ema" and loaded from there as the weights for
    # evaluation, the demo, export and fine-tuning (--resume restores both). Its decay ramps up as
    # DECAY * (1 - exp(-iteration / WARMUP_ITERS)); D-FINE's values are 0.9999 and 1000 (COCO
    # schedules of 10^5 iterations: the average spans about 10^4 of them).
    cfg.MODEL_EMA = CN()
    cfg.MODEL_EMA.ENABLED = False
    cfg.MODEL_EMA.DECAY = 0.9999
    cfg.MODEL_EMA.WARMUP_ITERS = 1000

    # "ADAMW" (default) or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Learning-rate factor of the backbone's parameters.
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.BETAS = (0.9, 0.999)
    # Stop training, as on a non-finite loss, before applying a step whose loss or gradient norm is
    # more than FACTOR times its median over the last WINDOW steps (checked once WINDOW steps have
    # run): a divergence that stays finite. 0 = off.
    cfg.SOLVER.DIVERGENCE = CN()
    cfg.SOLVER.DIVERGENCE.FACTOR = 100.0
    cfg.SOLVER.DIVERGENCE.WINDOW = 100

    # The DETR data augmentation (tools/train_net.py's mapper).
    # Random resize-crop-resize with this probability; crop size range as fractions of the image.
    cfg.INPUT.DETR_CROP = CN()
    cfg.INPUT.DETR_CROP.ENABLED = True
    cfg.INPUT.DETR_CROP.PROB = 0.5
    cfg.INPUT.DETR_CROP.RESIZE_SHORT = (400, 500, 600)
    cfg.INPUT.DETR_CROP.SIZE = (384, 600)

    # DEIM's dense one-to-one matching: with probability PROB a training image becomes a 2x2 mosaic
    # of itself and three random training images (each resized to its size), so that each image
    # brings four times the objects to the one-to-one matching; until iteration UNTIL_ITER (0: the
    # whole schedule), after which the images are plain again (DEIM stops it halfway).
    cfg.INPUT.MOSAIC = CN()
    cfg.INPUT.MOSAIC.ENABLED = False
    cfg.INPUT.MOSAIC.PROB = 0.5
    cfg.INPUT.MOSAIC.UNTIL_ITER = 0

    # D-FINE's (and RT-DETR's) strong augmentation, before the flip and resize: torchvision's
    # RandomPhotometricDistort (p 0.5), RandomZoomOut (fill 0, the canvas 1 to ZOOM_OUT_MAX times
    # the image's sides, p 0.5) and RandomIoUCrop (p 0.8), boxes under 1 pixel dropped; until
    # iteration UNTIL_ITER (0: the whole schedule), after which the images are plain again (D-FINE
    # stops it for the last ~8% of its COCO schedules: epoch 120 of 132 for its S model).
    cfg.INPUT.DFINE_AUG = CN()
    cfg.INPUT.DFINE_AUG.ENABLED = False
    cfg.INPUT.DFINE_AUG.ZOOM_OUT_MAX = 4.0
    cfg.INPUT.DFINE_AUG.UNTIL_ITER = 0

    # Extra COCO-format datasets, registered from the config: a list of (name, json, image_root).
    cfg.DATASETS.COCO_FORMAT = []
    # Where the embedded toy dataset is written (generated on first use).
    cfg.DATASETS.TOY_ROOT = "datasets/toy_coco"
    # Where the second synthetic dataset (crowded scenes, 10 classes) is written.
    cfg.DATASETS.TOY_CROWD_ROOT = "datasets/toy_crowd"


def setup_cfg(config_file=None, opts=(), *, freeze=True):
    """Detectron2's defaults, this project's keys, ``config_file`` and ``KEY VALUE`` ``opts``, then
    the fallbacks for this machine: without CUDA, ``MODEL.DEVICE`` cuda becomes cpu and AMP training
    (``SOLVER.AMP.ENABLED``) is turned off. Each fallback is logged once, by the main process, on
    the ``mobileformer_det`` logger.
    """
    cfg = get_cfg()
    add_mobileformer_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    fallbacks = []
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
        fallbacks.append("no CUDA device: MODEL.DEVICE set to cpu")
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        cfg.SOLVER.AMP.ENABLED = False
        fallbacks.append("SOLVER.AMP.ENABLED turned off: AMP training needs CUDA")
    if comm.is_main_process():
        for message in fallbacks:
            logging.getLogger("mobileformer_det").warning(message)
    if freeze:
        cfg.freeze()
    return cfg


# Where each meta architecture reads its class count: Detectron2's own detectors in their heads' keys;
# MF-DETR and PeerDETR in MODEL.MF_DETR.
_NUM_CLASSES_KEYS = {"RetinaNet": "MODEL.RETINANET.NUM_CLASSES", "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES"}


def num_classes(cfg):
    """The class count of ``cfg``'s detector and the key it is read from, e.g.
    ``(4, "MODEL.RETINANET.NUM_CLASSES")`` for a RetinaNet."""
    key = _NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE, "MODEL.MF_DETR.NUM_CLASSES")
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node, key
