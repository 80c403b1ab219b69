"""MF-DETR: a DETR-style set-prediction detector on Mobile-Former's multi-scale maps and global tokens."""
import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, detector_postprocess
from detectron2.structures import ImageList
from torch import nn
from torchvision.ops import box_convert

from .assigner import AnchorAssigner
from .criterion import SetCriterion
from .denoising import build_denoising_queries
from .matcher import HungarianMatcher
from .neck import Neck
from ..backbone.layers import valid_mask
from .position_encoding import sine_embed_mask
from .postprocess import PostProcess
from .transformer import Transformer

__all__ = ["MFDETR"]


@META_ARCH_REGISTRY.register()
class MFDETR(nn.Module):
    """Mobile-Former backbone -> neck -> deformable decoder whose queries also attend to the global tokens.

    ``forward(batched_inputs)`` follows Detectron2: a list of dicts with ``image`` (``[3, H, W]``
    uint8 in ``input_format``), ``height``/``width`` (output size) and, in training, ``instances``.
    Training returns a dict of losses; inference a list of ``{"instances": Instances}`` with
    ``pred_boxes``, ``scores`` and ``pred_classes`` at the output size.
    """

    @configurable
    def __init__(self, *, backbone, in_features, num_classes, transformer, criterion, neck, token_proj,
                 token_pos, level_embed, pixel_mean, pixel_std, postprocess, input_format="RGB", dn_number=0,
                 dn_label_noise=0.2, dn_box_noise=0.4, dn_negatives=False):
        super().__init__()
        self.backbone, self.in_features = backbone, list(in_features)
        self.num_classes = num_classes
        self.transformer, self.criterion, self.neck = transformer, criterion, neck
        self.token_proj, self.token_pos, self.level_embed = token_proj, token_pos, level_embed
        self.postprocess = postprocess
        self.input_format = input_format
        self.dn_number, self.dn_label_noise, self.dn_box_noise = dn_number, dn_label_noise, dn_box_noise
        self.dn_negatives = dn_negatives
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.deployed = False  # True after ``deploy``: inference only

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.MF_DETR
        dec, loss, proposals = c.DECODER, c.LOSS, c.PROPOSALS
        if cfg.INPUT.FORMAT != "RGB":
            raise ValueError(f"MF-DETR expects INPUT.FORMAT 'RGB' (Mobile-Former is trained on RGB), got {cfg.INPUT.FORMAT!r}")
        if cfg.MODEL.MASK_ON or cfg.MODEL.KEYPOINT_ON:
            raise ValueError("MF-DETR predicts boxes only: set MODEL.MASK_ON False and MODEL.KEYPOINT_ON False")
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        if not c.USE_TOKENS:
            backbone.drop_token_output()
        shapes = backbone.output_shape()
        in_features = list(cfg.MODEL.MOBILEFORMER.OUT_FEATURES)
        num_extra = c.NUM_FEATURE_LEVELS - len(in_features)
        if num_extra < 0:
            raise ValueError(
                f"MODEL.MF_DETR.NUM_FEATURE_LEVELS={c.NUM_FEATURE_LEVELS} is fewer than the "
                f"{len(in_features)} maps of MODEL.MOBILEFORMER.OUT_FEATURES={in_features}"
            )
        if proposals.ASSIGN not in ("hungarian", "anchor_iou"):
            raise ValueError(f"MODEL.MF_DETR.PROPOSALS.ASSIGN must be 'hungarian' or 'anchor_iou', got {proposals.ASSIGN!r}")
        if proposals.ASSIGN == "anchor_iou" and not proposals.TWO_STAGE:
            raise ValueError("MODEL.MF_DETR.PROPOSALS.ASSIGN 'anchor_iou' trains the two-stage proposals: "
                             "set MODEL.MF_DETR.PROPOSALS.TWO_STAGE True or PROPOSALS.ASSIGN 'hungarian'")
        if not 0.0 <= proposals.NMS_THRESH < 1.0:
            raise ValueError(f"MODEL.MF_DETR.PROPOSALS.NMS_THRESH must be in [0, 1) (0 = off), got {proposals.NMS_THRESH}")
        matcher = HungarianMatcher(c.MATCHER.COST_CLASS, c.MATCHER.COST_BBOX, c.MATCHER.COST_GIOU,
                                   loss.FOCAL_ALPHA, loss.FOCAL_GAMMA)
        return {
            "backbone": backbone,
            "in_features": in_features,
            "num_classes": c.NUM_CLASSES,
            "neck": Neck([shapes[f].channels for f in in_features], c.HIDDEN_DIM, num_extra, aifi_layers=c.AIFI_LAYERS,
                         ffn_dim=dec.DIM_FEEDFORWARD, num_heads=dec.NHEADS, dropout=dec.DROPOUT),
            "transformer": Transformer(
                c.HIDDEN_DIM, dec.DIM_FEEDFORWARD, c.NUM_FEATURE_LEVELS, c.NUM_QUERIES, c.NUM_CLASSES,
                enc_layers=c.ENC_LAYERS, dec_layers=dec.NUM_LAYERS, num_heads=dec.NHEADS, num_points=dec.NUM_POINTS,
                dropout=dec.DROPOUT, two_stage=proposals.TWO_STAGE, denoising=c.DENOISING.NUM_QUERIES > 0,
                aux_loss=dec.AUX_LOSS, use_tokens=c.USE_TOKENS, look_forward_twice=dec.LOOK_FORWARD_TWICE,
                num_queries_one2many=c.ONE2MANY.NUM_QUERIES, proposal_nms_thresh=proposals.NMS_THRESH,
                box_refinement=dec.BOX_REFINEMENT, reg_max=dec.REG_MAX, reg_scale=dec.REG_SCALE, reg_up=dec.REG_UP,
            ),
            "criterion": SetCriterion(
                c.NUM_CLASSES, matcher, loss.CLASS_WEIGHT, loss.BBOX_WEIGHT, loss.GIOU_WEIGHT, loss.FOCAL_ALPHA,
                loss.FOCAL_GAMMA, class_loss=loss.CLASS_TYPE, vfl_alpha=loss.VFL_ALPHA,
                mal_gamma=loss.MAL_GAMMA, fgl_weight=loss.FGL_WEIGHT, ddf_weight=loss.DDF_WEIGHT,
                ddf_temperature=loss.DDF_TEMPERATURE,
                one2many_repeats=c.ONE2MANY.REPEATS,
                proposal_assigner=AnchorAssigner() if proposals.ASSIGN == "anchor_iou" else None,
            ),
            "token_proj": (nn.Sequential(nn.Linear(backbone.token_dim, c.HIDDEN_DIM), nn.LayerNorm(c.HIDDEN_DIM))
                           if c.USE_TOKENS else None),
            "token_pos": nn.Embedding(backbone.num_tokens, c.HIDDEN_DIM) if c.USE_TOKENS else None,
            "level_embed": nn.Parameter(torch.randn(c.NUM_FEATURE_LEVELS, c.HIDDEN_DIM) * 0.02),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "postprocess": PostProcess.from_config(cfg),
            "input_format": cfg.INPUT.FORMAT,
            "dn_number": c.DENOISING.NUM_QUERIES,
            "dn_label_noise": c.DENOISING.LABEL_NOISE,
            "dn_box_noise": c.DENOISING.BOX_NOISE,
            "dn_negatives": c.DENOISING.NEGATIVES,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def normalize(self, images):
        """``[N, 3, H, W]`` RGB 0-255 -> normalised with the ImageNet mean and std."""
        return (images - self.pixel_mean) / self.pixel_std

    def preprocess_image(self, batched_inputs):
        """Normalise and pad (with zeros, after normalisation). Returns the ``ImageList``."""
        images = [self.normalize(x["image"].to(self.device)) for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def encode(self, images, image_sizes=None):
        """Backbone + neck, flattened for the transformer.

        Args:
            images: ``[N, 3, H, W]`` normalised, zero-padded images.
            image_sizes: ``[N, 2]`` int tensor of each image's (h, w) before padding, or None when
                no image is padded (then no mask is computed anywhere).
        Returns a dict, the transformer's inputs: ``memory`` (the neck's: ``[N, S, dim]`` with the
        level embedding, or its factored form once deployed), ``pos`` ``[N, S, dim]`` (sine
        position encoding; None without an encoder), ``padding_mask`` ``[N, S]`` (True on padding;
        None without padding), ``spatial_shapes`` list of (H_l, W_l), ``valid_ratios``
        ``[N, L, 2]``, ``tokens``/``token_pos`` ``[N, M, dim]`` (None without ``USE_TOKENS``).
        """
        features = self.backbone(images, image_sizes)
        tokens = token_pos = None
        if self.token_proj is not None:
            tokens = self.token_proj(features["tokens"])
            token_pos = self.token_pos.weight[None].expand(images.shape[0], -1, -1).to(tokens.dtype)
        strides = [self.backbone.output_shape()[f].stride for f in self.in_features]
        last = strides[-1]
        memory, shapes = self.neck([features[f] for f in self.in_features], self.level_embed,
                                   None if image_sizes is None else lambda k, h, w: valid_mask(image_sizes, last * k, h, w))
        strides += [last * 2 ** (i + 1) for i in range(len(shapes) - len(strides))]
        n = images.shape[0]
        pos, masks, ratios = [], [], []
        for (h, w), stride in zip(shapes, strides):
            if image_sizes is None:
                m = None
            else:
                m = ~valid_mask(image_sizes, stride, h, w)[:, 0]
                masks.append(m.flatten(1))
                ratios.append(torch.stack([(~m[:, 0, :]).sum(1).float() / w, (~m[:, :, 0]).sum(1).float() / h], -1))
            if self.transformer.encoder:  # only the encoder uses positions on the map
                m = torch.zeros(n, h, w, dtype=torch.bool, device=images.device) if m is None else m
                pos.append(sine_embed_mask(m, self.level_embed.shape[1] // 2).to(memory.dtype).flatten(2).transpose(1, 2))
        return {
            "memory": memory,
            "pos": torch.cat(pos, 1) if pos else None,
            "padding_mask": torch.cat(masks, 1) if masks else None, "spatial_shapes": shapes,
            "valid_ratios": torch.stack(ratios, 1) if ratios else torch.ones(n, len(shapes), 2, device=images.device),
            "tokens": tokens, "token_pos": token_pos,
        }

    @staticmethod
    def padded_sizes(images):
        """``[N, 2]`` int64 (h, w) of each image of an ``ImageList`` when some image is padded,
        else None (decided on the host: an unpadded batch builds no mask)."""
        padded = any(tuple(size) != tuple(images.tensor.shape[-2:]) for size in images.image_sizes)
        if not padded:
            return None
        return torch.tensor([[int(h), int(w)] for h, w in images.image_sizes], device=images.tensor.device)

    def predict(self, images, image_sizes=None):
        """The network at inference, tensor in, tensor out: what evaluation, the demo and the
        exported graph all run.

        Args:
            images: ``[N, 3, H, W]`` normalised (:meth:`normalize`), zero-padded images.
            image_sizes: ``[N, 2]`` int (h, w) of each image before padding; None when none is padded.
        Returns:
            (logits ``[N, Q, K]``, boxes ``[N, Q, 4]`` normalised cxcywh) of the last decoder layer.
        """
        outputs, _, _ = self.transformer(**self.encode(images, image_sizes))
        return outputs[-1]

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        if not self.training:
            logits, boxes = self.predict(images.tensor, self.padded_sizes(images))
            # (h, w) ints, or tensors when traced (flop counting)
            sizes = torch.stack([torch.as_tensor(s, device=logits.device) for s in images.image_sizes]).float()
            boxes, scores, labels = self.postprocess(logits, boxes, sizes)
            return [
                {"instances": detector_postprocess(self.postprocess.select(b, s, l, size),
                                                   x.get("height", size[0]), x.get("width", size[1]))}
                for b, s, l, x, size in zip(boxes, scores, labels, batched_inputs, images.image_sizes)
            ]

        if self.deployed:
            raise RuntimeError("this MF-DETR was prepared for inference (its neck is folded into the decoder): "
                               "train the model as built, and prepare a copy for inference")
        targets = self.prepare_targets([x["instances"].to(self.device) for x in batched_inputs], images.image_sizes)
        denoising = None
        if self.dn_number > 0:  # also when no image has a box: every worker computes the same losses
            denoising = build_denoising_queries(
                targets, self.num_classes, self.dn_number, self.dn_label_noise, self.dn_box_noise,
                self.transformer.num_queries + self.transformer.num_queries_one2many, self.transformer.label_embed,
                self.dn_negatives)
        outputs, enc_outputs, distributions = self.transformer(**self.encode(images.tensor, self.padded_sizes(images)),
                                                               denoising=denoising)
        return self.criterion(outputs, targets, enc_outputs, denoising, self.transformer.num_queries_one2many,
                              distributions)

    @torch.no_grad()
    def deploy(self, channels_last=True):
        """Prepare for inference, each module converting itself (D-FINE's ``deploy``): batch norm
        folded into the backbone's convolutions, the neck folded into the layers that read the
        memory (not with an encoder, which rewrites the memory) and, with ``channels_last``, the
        backbone in channels-last memory (faster convolutions on CPUs and GPUs; ONNX export does
        not want it). The outputs equal the plain model's to float rounding. Eval mode; the
        deployed model refuses to train. In place; returns the model."""
        self.eval()
        self.backbone.convert_to_deploy(channels_last)
        if not self.deployed and not len(self.transformer.encoder):
            self.transformer.convert_to_deploy(self.neck.convert_to_deploy(self.level_embed))
        self.deployed = True
        return self

    @staticmethod
    def prepare_targets(instances, image_sizes):
        """Ground truth as normalised cxcywh boxes ``[T, 4]`` and labels ``[T]`` per image."""
        targets = []
        for inst, (h, w) in zip(instances, image_sizes):
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=inst.gt_boxes.device)
            boxes = box_convert(inst.gt_boxes.tensor / scale, "xyxy", "cxcywh")
            targets.append({"labels": inst.gt_classes, "boxes": boxes})
        return targets
