"""MF-DETR: a DETR-style set-prediction detector on Mobile-Former's multi-scale maps and global tokens."""
import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torchvision.ops import batched_nms, box_convert

from .assigner import AnchorAssigner
from .criterion import SetCriterion
from .denoising import build_denoising_queries
from .factored_memory import FactoredMemory
from .matcher import HungarianMatcher
from ..backbone.layers import valid_mask
from .position_encoding import sine_embed_mask
from .transformer import Transformer

__all__ = ["MFDETR", "top_detections", "suppress_duplicates"]


class Neck(nn.Module):
    """1x1 conv + channel LayerNorm per backbone level to the decoder width, and ``num_extra``
    stride-2 3x3 convs on the last map for coarser levels (Deformable DETR's input projection).

    Deformable DETR normalises with GroupNorm, whose statistics run over the whole padded map;
    a per-position LayerNorm keeps an image's features independent of the batch's padding.
    """

    def __init__(self, in_channels, dim, num_extra=0):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, 1), get_norm("LN", dim)) for c in in_channels)
        extra_in = [in_channels[-1]] + [dim] * (num_extra - 1)
        self.extra = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, 3, stride=2, padding=1), get_norm("LN", dim)) for c in extra_in[:num_extra]
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.variance = nn.ModuleDict()  # level -> 1x1 conv by R, filled by ``factorise``

    def forward(self, maps, mask_fn=None, factored=False):
        """
        Args:
            maps: list of ``[N, C_l, H_l, W_l]``, zero on padding.
            mask_fn: optional ``(stride multiplier, h, w) -> [N, 1, h, w]`` valid mask of an extra
                level, used to zero its padding before the next stride-2 conv reads it.
            factored: after :meth:`factorise`, give each level as its factor for inference
                (``factored_memory.py``): a lateral level narrower than the output as
                ``[x * r, r, 1]`` ``[N, C_l + 2, H_l, W_l]`` (``r``: the reciprocal standard
                deviation its LayerNorm divides by at each position), any other level as
                ``[y, 1]`` ``[N, dim + 1, H_l, W_l]`` with ``y`` what ``forward`` gives.
        Returns:
            list of ``[N, dim, H_l, W_l]`` (or their factors), the extra levels last.
        """
        out = []
        for lvl, ((conv, norm), x) in enumerate(zip(self.lateral, maps)):
            if factored and str(lvl) in self.variance:
                # |R [x; 1]|^2 / dim is the variance over the conv's output channels: a product with
                # R's C_l + 1 rows instead of the conv's dim, and a sum of squares (no cancellation)
                variance = self.variance[str(lvl)](x).pow(2).sum(1, keepdim=True) / norm.weight.shape[0]
                r = torch.rsqrt(variance + norm.eps)
                out.append(torch.cat([x * r, r, torch.ones_like(r)], 1))
            else:
                out.append(_with_ones(norm(conv(x))) if factored else norm(conv(x)))
        extra = self._extra_levels(maps[-1], mask_fn)
        return out + ([_with_ones(y) for y in extra] if factored else extra)

    @torch.no_grad()
    def factorise(self, level_embed):
        """Prepare ``forward(factored=True)`` and return ``M_l`` ``[dim, K_l]`` (float64) of each
        level, with ``memory_l = M_l factor_l`` at every position once the level embedding
        ``level_embed[l]`` is added (see ``factored_memory.py``). The lateral levels that have
        fewer channels than the output (C_l + 2 <= dim) are factored; the other levels are their own
        factors (``M_l = [I | e_l]``). Changes no weight of the trained model."""
        dim = level_embed.shape[1]
        embed = level_embed.double()
        eye = torch.eye(dim, dtype=torch.float64, device=level_embed.device)
        self.variance.clear()
        factors = []
        for lvl, (conv, norm) in enumerate(self.lateral):
            weight = conv.weight.double().flatten(1)                              # [dim, C_l]
            if weight.shape[1] + 2 > dim:
                factors.append(torch.cat([eye, embed[lvl][:, None]], 1))
                continue
            # LayerNorm first subtracts the mean over the output channels: linear in [x; 1]
            bias = conv.bias.double()
            centred = torch.cat([weight - weight.mean(0), (bias - bias.mean())[:, None]], 1)
            tri = torch.linalg.qr(centred, mode="r")[1]                         # R: [C_l + 1, C_l + 1]
            variance = nn.utils.skip_init(nn.Conv2d, weight.shape[1], tri.shape[0], 1,
                                          device=conv.weight.device, dtype=conv.weight.dtype)
            variance.weight.copy_(tri[:, :-1, None, None])
            variance.bias.copy_(tri[:, -1])
            variance.requires_grad_(False)
            self.variance[str(lvl)] = variance
            gamma = norm.weight.double()[:, None]
            factors.append(torch.cat([gamma * centred, (norm.bias.double() + embed[lvl])[:, None]], 1))
        for lvl in range(len(self.lateral), level_embed.shape[0]):
            factors.append(torch.cat([eye, embed[lvl][:, None]], 1))
        return factors

    def _extra_levels(self, x, mask_fn):
        """The extra levels from the last map ``x``: list of ``[N, dim, H_l, W_l]``."""
        out = []
        for i, conv in enumerate(self.extra):
            x = conv(x)
            if mask_fn is not None:
                x = x * mask_fn(2 ** (i + 1), *x.shape[-2:]).to(x.dtype)
            out.append(x)
        return out


def _with_ones(y):
    """``[N, C, H, W]`` -> ``[N, C + 1, H, W]``, a channel of ones appended (it carries biases)."""
    return torch.cat([y, y.new_ones(y.shape[0], 1, *y.shape[2:])], 1)


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
                 token_pos, level_embed, pixel_mean, pixel_std, input_format="RGB", test_topk=100,
                 test_score_thresh=0.0, test_nms_thresh=0.0, dn_number=0, dn_label_noise=0.2, dn_box_noise=0.4,
                 dn_negatives=False):
        super().__init__()
        self.backbone, self.in_features = backbone, list(in_features)
        self.num_classes = num_classes
        self.transformer, self.criterion, self.neck = transformer, criterion, neck
        self.token_proj, self.token_pos, self.level_embed = token_proj, token_pos, level_embed
        self.input_format = input_format
        self.test_topk, self.test_score_thresh, self.test_nms_thresh = test_topk, test_score_thresh, test_nms_thresh
        self.dn_number, self.dn_label_noise, self.dn_box_noise = dn_number, dn_label_noise, dn_box_noise
        self.dn_negatives = dn_negatives
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # True once ``inference.fold_neck`` has folded the neck into the memory's readers:
        # ``encode`` then returns the memory as a ``FactoredMemory``.
        self.factored_memory = False

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.MF_DETR
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
        if c.PROPOSAL_ASSIGN not in ("hungarian", "anchor_iou"):
            raise ValueError(f"MODEL.MF_DETR.PROPOSAL_ASSIGN must be 'hungarian' or 'anchor_iou', got {c.PROPOSAL_ASSIGN!r}")
        if c.PROPOSAL_ASSIGN == "anchor_iou" and not c.TWO_STAGE:
            raise ValueError("MODEL.MF_DETR.PROPOSAL_ASSIGN 'anchor_iou' trains the two-stage proposals: "
                             "set MODEL.MF_DETR.TWO_STAGE True or PROPOSAL_ASSIGN 'hungarian'")
        if not 0.0 <= c.PROPOSAL_NMS_THRESH < 1.0:
            raise ValueError(f"MODEL.MF_DETR.PROPOSAL_NMS_THRESH must be in [0, 1) (0 = off), got {c.PROPOSAL_NMS_THRESH}")
        matcher = HungarianMatcher(c.COST_CLASS, c.COST_BBOX, c.COST_GIOU, c.FOCAL_ALPHA, c.FOCAL_GAMMA)
        return {
            "backbone": backbone,
            "in_features": in_features,
            "num_classes": c.NUM_CLASSES,
            "neck": Neck([shapes[f].channels for f in in_features], c.HIDDEN_DIM, num_extra),
            "transformer": Transformer(
                c.HIDDEN_DIM, c.DIM_FEEDFORWARD, c.NUM_FEATURE_LEVELS, c.NUM_QUERIES, c.NUM_CLASSES,
                enc_layers=c.ENC_LAYERS, dec_layers=c.DEC_LAYERS, num_heads=c.NHEADS, num_points=c.NUM_POINTS,
                dropout=c.DROPOUT, two_stage=c.TWO_STAGE, denoising=c.DN_NUMBER > 0, aux_loss=c.AUX_LOSS,
                use_tokens=c.USE_TOKENS, look_forward_twice=c.LOOK_FORWARD_TWICE,
                num_queries_one2many=c.NUM_QUERIES_ONE2MANY,
                proposal_assigner=AnchorAssigner() if c.PROPOSAL_ASSIGN == "anchor_iou" else None,
                proposal_nms_thresh=c.PROPOSAL_NMS_THRESH,
            ),
            "criterion": SetCriterion(
                c.NUM_CLASSES, matcher, c.CLASS_WEIGHT, c.BBOX_WEIGHT, c.GIOU_WEIGHT, c.FOCAL_ALPHA, c.FOCAL_GAMMA,
                class_loss=c.CLASS_LOSS, vfl_alpha=c.VFL_ALPHA, one2many_repeats=c.ONE2MANY_REPEATS,
            ),
            "token_proj": (nn.Sequential(nn.Linear(backbone.token_dim, c.HIDDEN_DIM), nn.LayerNorm(c.HIDDEN_DIM))
                           if c.USE_TOKENS else None),
            "token_pos": nn.Embedding(backbone.num_tokens, c.HIDDEN_DIM) if c.USE_TOKENS else None,
            "level_embed": nn.Parameter(torch.randn(c.NUM_FEATURE_LEVELS, c.HIDDEN_DIM) * 0.02),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "test_topk": c.TEST_TOPK,
            "test_score_thresh": c.TEST_SCORE_THRESH,
            "test_nms_thresh": c.TEST_NMS_THRESH,
            "dn_number": c.DN_NUMBER,
            "dn_label_noise": c.DN_LABEL_NOISE,
            "dn_box_noise": c.DN_BOX_NOISE,
            "dn_negatives": c.DN_NEGATIVES,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs):
        """Normalise and pad (with zeros, after normalisation). Returns the ``ImageList``."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def encode(self, images, image_sizes=None):
        """Backbone + neck, flattened for the transformer.

        Args:
            images: ``[N, 3, H, W]`` normalised, zero-padded images.
            image_sizes: ``[N, 2]`` int tensor of each image's (h, w) before padding, or None when
                no image is padded (then no mask is computed anywhere).
        Returns a dict: ``memory`` ``[N, S, dim]`` (with the level embedding; a ``FactoredMemory``
        after ``inference.fold_neck``), ``pos`` ``[N, S, dim]``
        (sine position encoding; None without an encoder), ``padding_mask`` ``[N, S]`` (True on
        padding; None without padding), ``spatial_shapes`` list of (H_l, W_l), ``valid_ratios``
        ``[N, L, 2]``, ``tokens``/``token_pos`` ``[N, M, dim]`` (None without ``USE_TOKENS``).
        """
        features = self.backbone(images, image_sizes)
        tokens = token_pos = None
        if self.token_proj is not None:
            tokens = self.token_proj(features["tokens"])
            token_pos = self.token_pos.weight[None].expand(images.shape[0], -1, -1).to(tokens.dtype)
        strides = [self.backbone.output_shape()[f].stride for f in self.in_features]
        last = strides[-1]
        maps = self.neck([features[f] for f in self.in_features],
                         None if image_sizes is None else lambda k, h, w: valid_mask(image_sizes, last * k, h, w),
                         factored=self.factored_memory)
        strides += [last * 2 ** (i + 1) for i in range(len(maps) - len(strides))]
        n = images.shape[0]
        memory, pos, masks, shapes, ratios = [], [], [], [], []
        for lvl, (x, stride) in enumerate(zip(maps, strides)):
            h, w = x.shape[-2:]
            shapes.append((h, w))
            # The level embedding is added to the features themselves: the decoder and the proposal
            # heads read them without positions (deformable attention samples each level apart).
            # A factored memory holds it in its readers' weights.
            x = x.flatten(2)                                                     # [N, C, H_l * W_l]
            memory.append(x if self.factored_memory else x.transpose(1, 2) + self.level_embed[lvl].to(x.dtype))
            if image_sizes is None:
                m = None
            else:
                m = ~valid_mask(image_sizes, stride, h, w)[:, 0]
                masks.append(m.flatten(1))
                ratios.append(torch.stack([(~m[:, 0, :]).sum(1).float() / w, (~m[:, :, 0]).sum(1).float() / h], -1))
            if self.transformer.encoder:  # only the encoder uses positions on the map
                m = torch.zeros(n, h, w, dtype=torch.bool, device=x.device) if m is None else m
                pos.append(sine_embed_mask(m, x.shape[1] // 2).to(x.dtype).flatten(2).transpose(1, 2))
        return {
            "memory": FactoredMemory(memory) if self.factored_memory else torch.cat(memory, 1),
            "pos": torch.cat(pos, 1) if pos else None,
            "padding_mask": torch.cat(masks, 1) if masks else None, "spatial_shapes": shapes,
            "valid_ratios": torch.stack(ratios, 1) if ratios else torch.ones(n, len(maps), 2, device=images.device),
            "tokens": tokens, "token_pos": token_pos,
        }

    def encode_images(self, images):
        """``encode`` of an ``ImageList``: masks only when some image is padded (decided on the host)."""
        padded = any(tuple(size) != tuple(images.tensor.shape[-2:]) for size in images.image_sizes)
        sizes = torch.tensor([[int(h), int(w)] for h, w in images.image_sizes], device=self.device) if padded else None
        return self.encode(images.tensor, sizes)

    def forward(self, batched_inputs):
        images = self.preprocess_image(batched_inputs)
        if not self.training:
            outputs, _ = self.transformer(**self.encode_images(images))
            return self.postprocess(outputs[-1], batched_inputs, images.image_sizes)

        if self.factored_memory:
            raise RuntimeError("this MF-DETR was prepared for inference (its neck is folded into the decoder): "
                               "train the model as built, and prepare a copy for inference")
        targets = self.prepare_targets([x["instances"].to(self.device) for x in batched_inputs], images.image_sizes)
        denoising = None
        if self.dn_number > 0:  # also when no image has a box: every worker computes the same losses
            denoising = build_denoising_queries(
                targets, self.num_classes, self.dn_number, self.dn_label_noise, self.dn_box_noise,
                self.transformer.num_queries + self.transformer.num_queries_one2many, self.transformer.label_embed,
                self.dn_negatives)
        outputs, enc_outputs = self.transformer(**self.encode_images(images), denoising=denoising, targets=targets)
        return self.criterion(outputs, targets, enc_outputs, denoising, self.transformer.num_queries_one2many)

    def postprocess(self, outputs, batched_inputs, image_sizes):
        """Final-layer ``(logits, boxes)`` -> list of ``{"instances"}`` at each input's height/width."""
        logits, boxes = outputs
        results = self.inference(logits, boxes, image_sizes)
        return [
            {"instances": detector_postprocess(r, x.get("height", size[0]), x.get("width", size[1]))}
            for r, x, size in zip(results, batched_inputs, image_sizes)
        ]

    @staticmethod
    def prepare_targets(instances, image_sizes):
        """Ground truth as normalised cxcywh boxes ``[T, 4]`` and labels ``[T]`` per image."""
        targets = []
        for inst, (h, w) in zip(instances, image_sizes):
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=inst.gt_boxes.device)
            boxes = box_convert(inst.gt_boxes.tensor / scale, "xyxy", "cxcywh")
            targets.append({"labels": inst.gt_classes, "boxes": boxes})
        return targets

    def inference(self, logits, boxes, image_sizes):
        """Top-k over queries x classes (:func:`top_detections`), boxes scaled to each image, then
        :func:`suppress_duplicates` with ``MODEL.MF_DETR.TEST_NMS_THRESH``.

        Args:
            logits: ``[N, Q, K]``; boxes: ``[N, Q, 4]`` normalised cxcywh.
            image_sizes: the (h, w) of each image before padding.
        Returns:
            list of ``Instances`` at those sizes.
        """
        results = []
        scores, labels, boxes = top_detections(logits, boxes, self.test_topk)
        for i, (h, w) in enumerate(image_sizes):
            b = boxes[i] * torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
            keep = scores[i] > self.test_score_thresh
            r = Instances((h, w))
            r.pred_boxes = Boxes(b[keep])
            r.pred_boxes.clip((h, w))
            r.scores = scores[i][keep]
            r.pred_classes = labels[i][keep]
            results.append(suppress_duplicates(r, self.test_nms_thresh))
        return results


def top_detections(logits, boxes, k):
    """The ``k`` best (query, class) pairs of each image (sigmoid scores, as in Deformable DETR).

    Args:
        logits: ``[N, Q, K]``; boxes: ``[N, Q, 4]`` normalised cxcywh.
    Returns:
        scores ``[N, k']`` (descending), labels ``[N, k']`` int64, boxes ``[N, k', 4]`` normalised
        xyxy, with ``k' = min(k, Q * K)``.
    """
    num_classes = logits.shape[-1]
    prob = logits.float().sigmoid().flatten(1)                                    # [N, Q*K]
    scores, index = prob.topk(min(k, prob.shape[1]), dim=1)
    query = torch.div(index, num_classes, rounding_mode="floor")
    boxes = torch.gather(boxes.float(), 1, query[..., None].expand(-1, -1, 4))
    return scores, index % num_classes, box_convert(boxes, "cxcywh", "xyxy")


def suppress_duplicates(instances, iou_thresh):
    """Class-wise non-maximum suppression of one image's detections (off when ``iou_thresh <= 0``).

    A set-prediction decoder trained to the end emits one box per object; one trained briefly still
    emits duplicates, which cost AP50 (``MODEL.MF_DETR.TEST_NMS_THRESH``; the COCO recipes keep it off).

    Args:
        instances: ``Instances`` with ``pred_boxes`` (``[D, 4]`` xyxy), ``scores`` ``[D]``, ``pred_classes`` ``[D]``.
        iou_thresh: a box is dropped when it overlaps a higher-scored box of its class by more than this IoU.
    Returns:
        the kept detections, by descending score (``instances`` itself when off).
    """
    if iou_thresh <= 0:
        return instances
    keep = batched_nms(instances.pred_boxes.tensor.float(), instances.scores.float(), instances.pred_classes, iou_thresh)
    return instances[keep]
