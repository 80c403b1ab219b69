"""Today's small detectors, built as their published configurations build them, from the field's
libraries: D-FINE, DEIMv2, RT-DETRv2, Deformable DETR and DETR from Hugging Face ``transformers``
(Apache-2.0; ``pip install -e ".[bench]"``), SSDLite and Faster R-CNN from torchvision. Random
weights: nothing is downloaded.

Each :class:`Peer` records what its authors published (COCO val2017 AP, parameters, GFLOPs, input
size) and, for the DETRs that :class:`~mobileformer_det.modeling.peers.PeerDETR` trains, the
optimiser of its own recipe. The configurations are mapped from the authors' YAMLs:
``configs/dfine/dfine_hgnetv2_{n,s}_coco.yml`` (Peterande/D-FINE) and
``configs/deimv2/deimv2_hgnetv2_{atto,femto,pico,n}_coco.yml`` (Intellindust-AI-Lab/DEIMv2).
``transformers`` builds every backbone batch norm frozen at identity by default
(``freeze_backbone_batch_norms``, right for a *pretrained* backbone); these recipes train them
(``freeze_norm: False``), and so do the builds here.
"""
import math
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["PEERS", "AuthorsCriterion", "Peer", "build_network", "build_peer", "recipe_overrides"]

IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

# HGNetV2 as DEIMv2's hgnetv2.py defines it: stem (in, mid, out); per stage (in, mid, out, blocks,
# downsample, light block, kernel, layers). Atto, Femto and Pico are B0 cut after its third stage.
_HGNETV2 = {
    "B0": ([3, 16, 16], [(16, 16, 64, 1, False, False, 3, 3), (64, 32, 256, 1, True, False, 3, 3),
                         (256, 64, 512, 2, True, True, 5, 3), (512, 128, 1024, 1, True, True, 5, 3)]),
    "Atto": ([3, 16, 16], [(16, 16, 64, 1, False, False, 3, 3), (64, 32, 256, 1, True, False, 3, 3),
                           (256, 64, 256, 1, True, True, 3, 3)]),
    "Femto": ([3, 16, 16], [(16, 16, 64, 1, False, False, 3, 3), (64, 32, 256, 1, True, False, 3, 3),
                            (256, 64, 512, 1, True, True, 5, 3)]),
    "Pico": ([3, 16, 16], [(16, 16, 64, 1, False, False, 3, 3), (64, 32, 256, 1, True, False, 3, 3),
                           (256, 64, 512, 2, True, True, 5, 3)]),
}


def _hgnetv2(name, out_stages):
    """transformers' ``HGNetV2Config`` of DEIMv2's HGNetV2 ``name`` (learnable affine blocks on),
    returning the stages ``out_stages`` (1-based: 3 is stride 16, 4 stride 32)."""
    from transformers import HGNetV2Config

    stem, stages = _HGNETV2[name]
    cin, mid, out, blocks, down, light, kernel, layers = (list(c) for c in zip(*stages))
    return HGNetV2Config(stem_channels=stem, stage_in_channels=cin, stage_mid_channels=mid, stage_out_channels=out,
                         stage_num_blocks=blocks, stage_downsample=down, stage_light_block=light,
                         stage_kernel_size=kernel, stage_numb_of_layers=layers, hidden_sizes=out, depths=blocks,
                         out_indices=list(out_stages), use_learnable_affine_block=True)


def _d_fine(size, num_labels, num_queries):
    """D-FINE-N (HGNetV2-B0, strides 16 and 32, width 128) or -S (B0, strides 8-32, width 256), 3
    decoder layers; VFL + L1 + GIoU + FGL + DDF, 100 denoising queries (its defaults)."""
    from transformers import DFineConfig, DFineForObjectDetection

    if size == "N":
        config = DFineConfig(
            backbone_config=_hgnetv2("B0", [3, 4]), encoder_in_channels=[512, 1024], feat_strides=[16, 32],
            num_feature_levels=2, encode_proj_layers=[1], d_model=128, encoder_hidden_dim=128, encoder_ffn_dim=512,
            decoder_ffn_dim=512, decoder_in_channels=[128, 128], decoder_n_points=[6, 6], depth_mult=0.5,
            hidden_expansion=0.34)
    else:
        config = DFineConfig(backbone_config=_hgnetv2("B0", [2, 3, 4]), encoder_in_channels=[256, 512, 1024],
                             decoder_n_points=[3, 6, 3], decoder_ffn_dim=512, depth_mult=0.34, hidden_expansion=0.5)
    config.update(dict(num_labels=num_labels, num_queries=num_queries, decoder_layers=3,
                       freeze_backbone_batch_norms=False))
    model = DFineForObjectDetection(config)
    init_as_the_authors(model)
    model.loss_function = AuthorsCriterion(config, "vfl", local=True, union=True)
    return model


# DEIMv2's HGNetV2 models: backbone, stages read, encoder width, decoder FFN, queries, points per level.
_DEIMV2 = {"Atto": ("Atto", [3], 64, 160, 100, [4, 2]), "Femto": ("Femto", [3], 96, 256, 150, [4, 2]),
           "Pico": ("Pico", [3], 112, 320, 200, [4, 2]), "N": ("B0", [3, 4], 128, 512, 300, [6, 6])}


def _deimv2(size, num_labels, num_queries):
    """DEIMv2 Atto / Femto / Pico (the lite encoder on the stride-16 map, which adds a pooled
    stride-32 level; shared box head; no gateway; MAL + L1 + GIoU on one-to-one matches) or N
    (the hybrid encoder with one AIFI layer, D-FINE's FGL and DDF too, the union of the layers'
    matches for the box losses), 3 decoder layers with SwiGLU FFNs and SiLU heads."""
    from transformers import Deimv2Config, Deimv2ForObjectDetection

    backbone, stages, width, ffn, queries, points = _DEIMV2[size]
    hgnet = _hgnetv2(backbone, stages)
    channels = [hgnet.stage_out_channels[s - 1] for s in stages]
    lite = size != "N"
    config = Deimv2Config(
        backbone_config=hgnet, freeze_backbone_batch_norms=False, num_labels=num_labels,
        num_queries=num_queries or queries, encoder_type="lite" if lite else "hybrid", encoder_in_channels=channels,
        feat_strides=[16, 32], encoder_hidden_dim=width, encoder_ffn_dim=512, encode_proj_layers=[] if lite else [1],
        encoder_layers=0 if lite else 1, hidden_expansion=0.34, depth_mult=0.5, d_model=width,
        decoder_in_channels=[width, width], num_feature_levels=2, decoder_n_points=points, decoder_layers=3,
        decoder_ffn_dim=ffn, decoder_activation_function="silu", share_bbox_head=lite, use_gateway=not lite,
        focal_loss_gamma=1.5)  # DEIMCriterion's gamma: MAL's IoU ** 1.5 targets
    model = Deimv2ForObjectDetection(config)
    # DEIMv2's DEIMTransformer scores and selects the map positions on the memory itself;
    # transformers 5.25 keeps D-FINE's projection and LayerNorm (enc_output) before them. Without
    # it the parameter counts are the authors' code's to the unit (tests/test_peers.py).
    model.model.enc_output = nn.Identity()
    # DEIMv2's YAMLs set `mlp_act: silu` and `activation: silu` (query position head, box heads,
    # proposal head, LQE); transformers 5.25 builds these MLPs with ReLU.
    for module in model.modules():
        if type(module).__name__ == "Deimv2MLP" and isinstance(module.act, nn.ReLU):
            module.act = nn.SiLU()
    init_as_the_authors(model)
    # DEIMCriterion: Atto to Pico `losses: ['mal', 'boxes']`, `use_uni_set: False`; N its defaults.
    model.loss_function = AuthorsCriterion(config, "mal", local=not lite, union=not lite)
    return model


def _xavier_rows(weights):
    """Xavier-uniform over the weights stacked along their output rows, as one matrix: how the
    authors' fused layers (``nn.MultiheadAttention``'s ``in_proj``, SwiGLU's ``w12``) draw what
    transformers keeps as separate layers."""
    fan_out, fan_in = sum(w.shape[0] for w in weights), weights[0].shape[1]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    for w in weights:
        nn.init.uniform_(w, -bound, bound)


@torch.no_grad()
def init_as_the_authors(model, prior=0.01):
    """Initialise a D-FINE or DEIMv2 model of ``transformers`` from scratch as the authors' code
    does. transformers draws every convolution and linear layer from N(0, 0.01)
    (``initializer_range``, which a checkpoint then overwrites) and the class biases for a prior
    of 1 / (classes + 1); the authors' modules keep PyTorch's own initialisation (the backbone and
    encoder included), except: the class biases for a prior of ``prior`` (0.01), the last layers
    of the box heads at zero, the query position head and the FFNs Xavier-uniform (SwiGLU's two
    input projections as one matrix), the self-attention as ``nn.MultiheadAttention`` draws it,
    the deformable attention's offsets on a grid with zero weights, the gates and LQE at zero, and
    every decoder layer and head a copy of the first (their ``copy.deepcopy``)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            m.reset_parameters()
    bias = -math.log((1 - prior) / prior)
    inner = model.model
    for m in model.modules():
        kind = type(m).__name__
        if kind.endswith("SelfAttention"):
            _xavier_rows([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight])
            for layer in (m.q_proj, m.k_proj, m.v_proj, m.o_proj):
                nn.init.zeros_(layer.bias)
        elif kind.endswith(("MultiscaleDeformableAttention", "Gate", "LQE")):
            model._init_weights(m)  # transformers' init of these is the authors'
        elif kind.endswith("SwiGLUFFN"):
            _xavier_rows([m.gate_proj.weight, m.up_proj.weight])
            nn.init.xavier_uniform_(m.down_proj.weight)
            for layer in (m.gate_proj, m.up_proj, m.down_proj):
                nn.init.zeros_(layer.bias)
        elif kind == "DFineDecoderLayer":  # D-FINE's linear1 and linear2
            for layer in m.mlp.layers:
                nn.init.xavier_uniform_(layer.weight)
    if isinstance(inner.enc_output, nn.Sequential):  # D-FINE's
        nn.init.xavier_uniform_(inner.enc_output[0].weight)
    nn.init.constant_(inner.enc_score_head.bias, bias)
    decoder = inner.decoder
    for layer in decoder.query_pos_head.layers:
        nn.init.xavier_uniform_(layer.weight)
    for head in (inner.enc_bbox_head, decoder.pre_bbox_head, *decoder.bbox_embed):
        nn.init.zeros_(head.layers[-1].weight)
        nn.init.zeros_(head.layers[-1].bias)
    for head in decoder.class_embed:
        nn.init.constant_(head.bias, bias)
    for copies in (decoder.layers, decoder.class_embed, decoder.bbox_embed):
        for other in copies[1:]:
            if other is not copies[0]:
                other.load_state_dict(copies[0].state_dict())


class AuthorsCriterion:
    """The loss terms of D-FINE's and DEIM's criterion (``DEIMCriterion`` of the DEIMv2 repository,
    D-FINE's ``DFINECriterion``) for a D-FINE or DEIMv2 model of ``transformers``: a
    ``loss_function`` with the signature and return value of ``DFineForObjectDetectionLoss``.

    The authors' criterion supervises the last layer (its class and box losses, and FGL), each
    earlier layer (with DDF from the last), the first layer's pre-refinement boxes
    (``pre_outputs``), the proposals, and each denoising layer and its pre-refinement boxes. The
    loss functions of ``transformers`` 5.25 zip the pre-refinement predictions with the layers'
    corners, so the second-to-last layer's normal queries and the last layer's denoising queries
    get no loss, the other layers' FGL and DDF read their neighbour's predictions, and the last
    layer has no FGL; and they compute FGL and DDF even where the recipe leaves them out (DEIMv2
    Atto to Pico: 7% of Atto's training step on the toy set). The terms here are transformers'
    own (``Deimv2Loss``: matcher, VFL / MAL, L1, GIoU, FGL, DDF, the denoising matches), on the
    predictions the authors pair them with.

    Args:
        config: the model's ``DFineConfig`` or ``Deimv2Config`` (matcher costs, loss weights, bins).
        class_loss: "vfl" (D-FINE) or "mal" (DEIM).
        local: FGL and DDF (``losses: [..., 'local']``).
        union: the box and local losses over the union of every set's matches (``use_uni_set``,
            GO-LSD), else each set's own.
    """

    _KEYS = ("num_labels", "matcher_alpha", "matcher_gamma", "matcher_class_cost", "matcher_bbox_cost",
             "matcher_giou_cost", "focal_loss_alpha", "focal_loss_gamma", "eos_coefficient", "max_num_bins",
             "reg_scale", "up")

    def __init__(self, config, class_loss, local, union):
        from transformers import Deimv2Config
        from transformers.loss.loss_deimv2 import Deimv2Loss

        self.criterion = Deimv2Loss(Deimv2Config(**{k: getattr(config, k) for k in self._KEYS}, mal_alpha=None,
                                                 use_dense_one_to_one=union))
        self.criterion.losses = [class_loss, "boxes"] + ["local"] * local
        self.criterion.weight_dict = {f"loss_{class_loss}": getattr(config, f"weight_loss_{class_loss}"),
                                      "loss_bbox": config.weight_loss_bbox, "loss_giou": config.weight_loss_giou,
                                      "loss_fgl": config.weight_loss_fgl, "loss_ddf": config.weight_loss_ddf}

    @staticmethod
    def _sets(classes, boxes, corners, anchors):
        """The pre-refinement set and one set per layer. ``classes`` ``[N, 1 + L, Q, K]`` and ``boxes``
        ``[N, 1 + L, Q, 4]``: the first layer's scores with the pre-refinement boxes, then each
        layer's; ``corners`` ``[N, L, Q, 4 * (bins + 1)]`` and ``anchors`` ``[N, L, Q, 4]``: each layer's."""
        boxes = boxes.clamp(0, 1)
        layers = [{"logits": classes[:, i + 1], "pred_boxes": boxes[:, i + 1], "pred_corners": corners[:, i],
                   "ref_points": anchors[:, i], "teacher_corners": corners[:, -1], "teacher_logits": classes[:, -1]}
                  for i in range(corners.shape[1])]
        return {"logits": classes[:, 0], "pred_boxes": boxes[:, 0]}, layers

    def __call__(self, logits, labels, device, pred_boxes, config, outputs_class, outputs_coord, enc_topk_logits,
                 enc_topk_bboxes, denoising_meta_values=None, predicted_corners=None, initial_reference_points=None,
                 **kwargs):
        self.criterion.to(device)
        dn = denoising_meta_values
        predictions = (outputs_class, outputs_coord, predicted_corners, initial_reference_points)
        if dn is not None:
            dn_predictions = [p.split(dn["dn_num_split"], 2)[0] for p in predictions]
            predictions = [p.split(dn["dn_num_split"], 2)[1] for p in predictions]
        pre, layers = self._sets(*predictions)
        # The last layer is the main set: its own corners as teacher give no DDF, as the authors'.
        outputs = dict(layers[-1], auxiliary_outputs=layers[:-1] + [pre, {"logits": enc_topk_logits,
                                                                          "pred_boxes": enc_topk_bboxes.clamp(0, 1)}])
        if dn is not None:
            dn_pre, dn_layers = self._sets(*dn_predictions)
            outputs.update(dn_auxiliary_outputs=dn_layers + [dn_pre], denoising_meta_values=dn)
        loss_dict = self.criterion(outputs, labels)
        return sum(loss_dict.values()), loss_dict, outputs["auxiliary_outputs"]


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


def _ssdlite():
    import torchvision

    return torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)


def _frcnn_mobilenet():
    import torchvision

    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)


@dataclass(frozen=True)
class Peer:
    """A published detector: how to build it and what its authors report.

    Attributes:
        build: ``build(num_labels, num_queries)`` -> the network (``num_queries`` 0: its own),
            for the DETRs of ``transformers``; ``build()`` for torchvision's.
        ap, params, gflops: published COCO val2017 box AP, parameters (M) and GFLOPs (the
            authors' count: most count a multiply-add as two flops, fvcore as one).
        input_size: the (H, W) its AP and GFLOPs were published at.
        pixels: what its network takes: "unit" (RGB / 255, the HGNetV2 DETRs) or "imagenet"
            (RGB, ImageNet mean and std).
        recipe: its own optimiser, as ``SOLVER`` config overrides (None: not trained here).
    """

    build: object
    ap: float
    params: float
    gflops: float
    input_size: tuple
    pixels: str = "unit"
    recipe: dict = field(default=None)

    @property
    def trainable(self):
        return self.recipe is not None

    @property
    def torchvision(self):
        return self.build in (_ssdlite, _frcnn_mobilenet)


def _adamw(lr, backbone_lr):
    """The D-FINE / DEIMv2 optimiser: AdamW (0.9, 0.999), weight decay 1e-4 (none on norms),
    full-model gradient norm clipped to 0.1 (``clip_max_norm``), weight average (``use_ema``)."""
    return {"SOLVER.OPTIMIZER": "ADAMW", "SOLVER.BASE_LR": lr, "SOLVER.BACKBONE_MULTIPLIER": backbone_lr / lr,
            "SOLVER.WEIGHT_DECAY": 1e-4, "SOLVER.BETAS": (0.9, 0.999), "SOLVER.CLIP_GRADIENTS.ENABLED": True,
            "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 0.1,
            "MODEL_EMA.ENABLED": True}


PEERS = {
    # DEIMv2 (2025, arXiv:2509.20787): its README's table.
    "DEIMv2-Atto": Peer(lambda k=80, q=0: _deimv2("Atto", k, q), 23.8, 0.5, 0.8, (320, 320), recipe=_adamw(2e-3, 1e-3)),
    "DEIMv2-Femto": Peer(lambda k=80, q=0: _deimv2("Femto", k, q), 31.0, 1.0, 1.7, (416, 416), recipe=_adamw(1.6e-3, 8e-4)),
    "DEIMv2-Pico": Peer(lambda k=80, q=0: _deimv2("Pico", k, q), 38.5, 1.5, 5.2, (640, 640), recipe=_adamw(1.6e-3, 8e-4)),
    "DEIMv2-N": Peer(lambda k=80, q=0: _deimv2("N", k, q), 43.0, 3.6, 6.8, (640, 640), recipe=_adamw(8e-4, 4e-4)),
    # D-FINE (ICLR 2025): its README's table.
    "D-FINE-N": Peer(lambda k=80, q=0: _d_fine("N", k, q or 300), 42.8, 4, 7, (640, 640), recipe=_adamw(8e-4, 4e-4)),
    "D-FINE-S": Peer(lambda k=80, q=0: _d_fine("S", k, q or 300), 48.5, 10, 25, (640, 640)),
    "RT-DETRv2-R18": Peer(lambda k=80, q=0: _rt_detr_v2_r18(), 47.9, 20, 60, (640, 640)),
    "Deformable DETR-R50": Peer(lambda k=80, q=0: _deformable_detr(), 43.8, 40, 173, (800, 1333), "imagenet"),
    "DETR-R50": Peer(lambda k=80, q=0: _detr(), 42.0, 41, 86, (800, 1333), "imagenet"),
    "SSDLite320-MobileNetV3": Peer(_ssdlite, 21.3, 3.4, 0.58, (320, 320)),
    "FRCNN-MobileNetV3-FPN": Peer(_frcnn_mobilenet, 32.8, 19.4, 4.49, (800, 1333)),
}


def recipe_overrides(name):
    """``KEY VALUE`` config overrides that train ``MODEL.META_ARCHITECTURE PeerDETR`` as peer
    ``name``'s own recipe trains it (its optimiser; the schedule's shape is the config's)."""
    peer = PEERS.get(name)
    if peer is None or not peer.trainable:
        raise ValueError(f"no training recipe for {name!r}: one of {[n for n, p in PEERS.items() if p.trainable]}")
    return ["MODEL.META_ARCHITECTURE", "PeerDETR", "MODEL.PEER.NAME", name] + [
        x for key, value in peer.recipe.items() for x in (key, value)]


def build_network(name, num_labels=80, num_queries=0):
    """Peer ``name``'s network with random weights, in train mode: a ``transformers`` model
    (``num_queries`` 0: its own count) or a torchvision detector."""
    peer = PEERS[name]
    return peer.build() if peer.torchvision else peer.build(num_labels, num_queries)


class _TransformersNetwork(nn.Module):
    """``network(pixel_values=...)`` on RGB 0-255 images ``[N, 3, H, W]`` -> ``(logits [N, Q, K],
    boxes [N, Q, 4] normalised cxcywh)``, with the peer's own input scaling inside."""

    def __init__(self, network, pixels):
        super().__init__()
        self.network = network
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if pixels == "imagenet" else ((0.0,) * 3, (255.0,) * 3)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), False)

    def forward(self, images):
        out = self.network(pixel_values=(images - self.mean) / self.std)
        return out.logits, out.pred_boxes


class _TorchvisionNetwork(nn.Module):
    """A torchvision detector on a batch tensor of RGB 0-255 images (it normalises and resizes inside)."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, images):
        return self.network(list(images / 255.0))


def build_peer(name, seed=0):
    """``(module in eval mode, exportable)`` for timing peer ``name`` (a key of :data:`PEERS`):
    ``module(images [N, 3, H, W] float32 RGB 0-255)`` runs its network with its own input scaling
    inside, as MF-DETR's graph has it; every parameter gets independent noise (std 1e-3) so that
    no two weight tensors are equal (runtimes merge equal computations on equal inputs).
    ``exportable``: whether its graph has fixed shapes (torchvision's keep NMS and data-dependent
    shapes: eager only)."""
    peer = PEERS[name]
    network = build_network(name)
    module = _TorchvisionNetwork(network) if peer.torchvision else _TransformersNetwork(network, peer.pixels)
    module.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=generator).to(p))
    return module, not peer.torchvision
