"""Mobile-Former as a Detectron2 backbone; the seven variants of the paper are rows of data."""
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import nn

from .blocks import BLOCK_TYPES
from .bridge import MobileToFormer
from .layers import conv_norm, fuse_conv_bn, init_reference_weights, valid_mask, zero_padding

__all__ = ["VARIANTS", "MobileFormerSpec", "MobileFormer", "build_mobileformer_backbone"]


@dataclass(frozen=True)
class MobileFormerSpec:
    """One Mobile-Former variant (arXiv 2108.05895), block by block as the authors' code builds it
    (github.com/AAboys/MobileFormer).

    ``blocks`` rows are ``(type, e1, c, n, s, e2)``: block type (``lite``/``down``/``mf``),
    first expansion, output channels, repeats, stride of the first repeat, second expansion
    (``down`` only). ``head_hidden`` is the classifier's FC width; ``groups`` > 1 gives grouped
    pointwise convolutions with channel shuffle (26M).
    """

    stem: int
    num_tokens: int
    token_dim: int
    head_hidden: int
    blocks: Tuple[Tuple[str, int, int, int, int, int], ...]
    groups: int = 1


_BLOCKS_52M = (
    ("lite", 3, 12, 1, 2, 0), ("mf", 3, 12, 1, 1, 3),
    ("down", 6, 24, 1, 2, 4), ("mf", 3, 24, 1, 1, 3),
    ("down", 6, 48, 1, 2, 4), ("mf", 4, 48, 1, 1, 4), ("mf", 6, 64, 1, 1, 4),
    ("down", 6, 96, 1, 2, 4), ("mf", 6, 96, 1, 1, 4),
)

VARIANTS = {
    "mf508": MobileFormerSpec(24, 6, 192, 1920, (
        ("lite", 2, 24, 1, 1, 0),
        ("down", 6, 40, 1, 2, 4), ("mf", 3, 40, 1, 1, 3),
        ("down", 6, 72, 1, 2, 4), ("mf", 3, 72, 1, 1, 3),
        ("down", 6, 128, 1, 2, 4), ("mf", 4, 128, 1, 1, 4), ("mf", 6, 176, 1, 1, 4), ("mf", 6, 176, 1, 1, 4),
        ("down", 6, 240, 1, 2, 4), ("mf", 6, 240, 1, 1, 4), ("mf", 6, 240, 1, 1, 4),
    )),
    "mf294": MobileFormerSpec(16, 6, 192, 1920, (
        ("lite", 2, 16, 1, 1, 0),
        ("down", 6, 24, 1, 2, 4), ("mf", 4, 24, 1, 1, 4),
        ("down", 6, 48, 1, 2, 4), ("mf", 4, 48, 1, 1, 4),
        ("down", 6, 96, 1, 2, 4), ("mf", 4, 96, 1, 1, 4), ("mf", 6, 128, 1, 1, 4), ("mf", 6, 128, 1, 1, 4),
        ("down", 6, 192, 1, 2, 4), ("mf", 6, 192, 1, 1, 4), ("mf", 6, 192, 1, 1, 4),
    )),
    "mf214": MobileFormerSpec(12, 6, 192, 1600, (
        ("lite", 2, 12, 1, 1, 0),
        ("down", 6, 20, 1, 2, 4), ("mf", 3, 20, 1, 1, 4),
        ("down", 6, 40, 1, 2, 4), ("mf", 4, 40, 1, 1, 4),
        ("down", 6, 80, 1, 2, 4), ("mf", 4, 80, 1, 1, 4), ("mf", 6, 112, 1, 1, 4), ("mf", 6, 112, 1, 1, 4),
        ("down", 6, 160, 1, 2, 4), ("mf", 6, 160, 1, 1, 4), ("mf", 6, 160, 1, 1, 4),
    )),
    "mf151": MobileFormerSpec(12, 6, 192, 1280, (
        ("lite", 2, 12, 1, 1, 0),
        ("down", 6, 16, 1, 2, 4), ("mf", 3, 16, 1, 1, 3),
        ("down", 6, 32, 1, 2, 4), ("mf", 3, 32, 1, 1, 3),
        ("down", 6, 64, 1, 2, 4), ("mf", 4, 64, 1, 1, 4), ("mf", 6, 88, 1, 1, 4), ("mf", 6, 88, 1, 1, 4),
        ("down", 6, 128, 1, 2, 4), ("mf", 6, 128, 1, 1, 4), ("mf", 6, 128, 1, 1, 4),
    )),
    "mf96": MobileFormerSpec(12, 4, 128, 1280, (
        ("lite", 2, 12, 1, 1, 0),
        ("down", 6, 16, 1, 2, 4),
        ("down", 6, 32, 1, 2, 4), ("mf", 3, 32, 1, 1, 3),
        ("down", 6, 64, 1, 2, 4), ("mf", 4, 64, 1, 1, 4), ("mf", 6, 88, 1, 1, 4),
        ("down", 6, 128, 1, 2, 4), ("mf", 6, 128, 1, 1, 4),
    )),
    "mf52": MobileFormerSpec(8, 3, 128, 1024, _BLOCKS_52M),
    "mf26": MobileFormerSpec(8, 3, 128, 1024, _BLOCKS_52M, groups=4),
}


class MobileFormer(Backbone):
    """Mobile-Former: a MobileNet (Mobile) and a token Transformer (Former) run in parallel,
    joined by a two-way cross-attention bridge in every Mobile-Former block.

    ``forward(images [N, 3, H, W])`` returns a dict with the requested feature maps among
    ``res2..res5`` (strides 4, 8, 16, 32; the last block of each stride)
    and, under ``"tokens"``, the global tokens ``[N, M, d]`` after the final Mobile->Former.
    Any input size works; ``output_shape()`` lists the maps only (tokens: ``num_tokens``,
    ``token_dim``).

    Args:
        spec: a :class:`MobileFormerSpec` (see ``VARIANTS``).
        out_features: names of the maps to return.
        norm: one of :data:`SUPPORTED_NORMS` (``detectron2.layers.get_norm``'s batch norms).
        drop_path: the largest stochastic-depth rate (the reference's linear schedule over blocks).
        freeze_at: 0 trains everything; 1 freezes the stem (with any block still at stride 2) and the
            tokens; k >= 2 also ``res2..res<k>``.
    """

    def __init__(self, spec, out_features=("res3", "res4", "res5"), norm="BN", drop_path=0.0, freeze_at=0):
        super().__init__()
        self.num_tokens, self.token_dim = spec.num_tokens, spec.token_dim
        self.tokens = nn.Parameter(torch.randn(spec.num_tokens, spec.token_dim))
        self.stem = conv_norm(3, spec.stem, 3, stride=2, norm=norm)

        blocks, stage_of_block, self._block_strides = [], [], []
        channels, stride = spec.stem, 2
        self._out_feature_channels, self._out_feature_strides = {}, {}
        num_rows = len(spec.blocks)
        for row, (kind, e1, c, n, s, e2) in enumerate(spec.blocks):
            for i in range(n):
                block_stride = s if i == 0 else 1
                blocks.append(BLOCK_TYPES[kind](
                    channels, c, block_stride, e1, token_dim=spec.token_dim, expand2=e2,
                    groups=spec.groups, norm=norm, drop_path=drop_path * (row + 1) / num_rows,
                ))
                channels, stride = c, stride * block_stride
                self._block_strides.append(stride)
                # Blocks still at stride 2 belong to the stem stage (frozen with it, never an output).
                name = "res{}".format(stride.bit_length() - 1) if stride >= 4 else "stem"
                stage_of_block.append(name)
                if name != "stem":
                    self._out_feature_channels[name] = channels
                    self._out_feature_strides[name] = stride
        self.blocks = nn.ModuleList(blocks)
        self.final_mobile_to_former = MobileToFormer(channels, spec.token_dim, 2, drop_path)
        self.num_channels = channels

        # The map of a stage is the output of its last block.
        self._stage_ends = {name: i for i, name in enumerate(stage_of_block)}
        unknown = set(out_features) - set(self._out_feature_channels)
        if unknown:
            raise ValueError(
                f"unknown Mobile-Former output(s) {sorted(unknown)}; "
                f"choose among {sorted(self._out_feature_channels)}"
            )
        self._out_features = list(out_features)
        self._stage_of_block = stage_of_block

        init_reference_weights(self)
        self.freeze(freeze_at)
        # Memory format of the maps; channels_last may be set for inference (convert_to_deploy).
        self.memory_format = torch.contiguous_format

    @property
    def size_divisibility(self):
        return 32

    def output_shape(self):
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    def freeze(self, freeze_at=0):
        """Freeze the stem and tokens (``freeze_at >= 1``) and the blocks of ``res2..res<freeze_at>``.

        Frozen parts get ``requires_grad=False`` and FrozenBatchNorm2d, as Detectron2's ResNet does.
        """
        if freeze_at <= 0:
            return self
        self.tokens.requires_grad_(False)
        frozen_stages = {"stem"} | {f"res{k}" for k in range(2, freeze_at + 1)}
        modules = [self.stem] + [b for b, s in zip(self.blocks, self._stage_of_block) if s in frozen_stages]
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(False)
        for i, block in enumerate(self.blocks):
            if block in modules:
                self.blocks[i] = FrozenBatchNorm2d.convert_frozen_batchnorm(block)
        self.stem = FrozenBatchNorm2d.convert_frozen_batchnorm(self.stem)
        return self

    def forward_features(self, x, image_sizes=None):
        """
        Args:
            x: ``[N, 3, H, W]`` normalised RGB images, zero-padded at the bottom and right.
            image_sizes: optional ``[N, 2]`` int tensor of each image's (h, w) before padding: padding
                then never reaches the valid part of any map, nor the tokens (see blocks.py). Pass
                None when no image is padded: the masks cost time (masked attention takes a slower
                kernel), and deciding that from the tensor would wait for the device.
        Returns:
            (dict of every stage map that ``self._out_features`` asks for, final map ``[N, C, H/32, W/32]``,
            tokens ``[N, M, d]`` after the final Mobile->Former, or None after :meth:`drop_token_output`).
        """
        outputs = {}
        x = F.relu6(self.stem(x.contiguous(memory_format=self.memory_format)))
        tokens = self.tokens.unsqueeze(0).expand(x.shape[0], -1, -1)
        stride = 2
        # 0/1 masks in the maps' dtype, made once per stride: every zeroing is then one multiply and
        # every bridge's attention bias one log, instead of a cast or a select per use
        mask_in = None if image_sizes is None else valid_mask(image_sizes, stride, *x.shape[-2:]).to(x.dtype)
        for i, block in enumerate(self.blocks):
            if self._block_strides[i] != stride:
                stride = self._block_strides[i]
                h, w = (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2
                mask_out = None if image_sizes is None else valid_mask(image_sizes, stride, h, w).to(x.dtype)
            else:
                mask_out = mask_in
            x, tokens = block(x, tokens, (mask_in, mask_out))
            mask_in = mask_out
            name = self._stage_of_block[i]
            if name in self._out_features and self._stage_ends[name] == i:
                outputs[name] = zero_padding(x, mask_in)
        tokens = None if self.final_mobile_to_former is None else self.final_mobile_to_former(x, tokens, mask_in)
        return outputs, x, tokens

    def forward(self, x, image_sizes=None):
        """
        Args:
            x: ``[N, 3, H, W]`` normalised RGB images.
            image_sizes: optional ``[N, 2]`` (h, w) before padding; with it, padded positions are
                zero in every returned map and take no part in the result.
        Returns:
            dict: ``name -> [N, C_name, H/stride, W/stride]`` for each of ``out_features``, and
            ``"tokens" -> [N, M, d]``.
        """
        outputs, _, tokens = self.forward_features(x, image_sizes)
        if tokens is not None:
            outputs["tokens"] = tokens
        return outputs

    @torch.no_grad()
    def convert_to_deploy(self, channels_last=True):
        """For inference (eval mode): batch norm folded into the convolutions (:func:`fuse_conv_bn`)
        and the maps in channels-last memory, or in contiguous memory without ``channels_last``
        (what ONNX export wants). The same function to float rounding. In place; returns self."""
        fuse_conv_bn(self)
        self.set_memory_format(torch.channels_last if channels_last else torch.contiguous_format)
        return self

    def set_memory_format(self, memory_format):
        """Run the backbone's maps in ``memory_format`` (``torch.channels_last`` or ``torch.contiguous_format``)."""
        self.to(memory_format=memory_format)
        self.memory_format = memory_format

    def drop_token_output(self):
        """Stop returning ``tokens`` (for a detector that does not read them): the final
        Mobile->Former, which only makes them, is removed, so that no parameter is left without a
        gradient (DistributedDataParallel requires that) and no time is spent on it. Its weights
        in a checkpoint are then reported as unused."""
        self.final_mobile_to_former = None


# The normalisations ``MODEL.MOBILEFORMER.NORM`` may name (``detectron2.layers.get_norm``'s batch norms).
SUPPORTED_NORMS = ("BN", "FrozenBN", "SyncBN", "nnSyncBN", "naiveSyncBN")


@BACKBONE_REGISTRY.register()
def build_mobileformer_backbone(cfg, input_shape):
    """Build a :class:`MobileFormer` from ``cfg.MODEL.MOBILEFORMER``."""
    mf = cfg.MODEL.MOBILEFORMER
    if mf.VARIANT not in VARIANTS:
        raise ValueError(
            f"MODEL.MOBILEFORMER.VARIANT={mf.VARIANT!r} is not a Mobile-Former variant; "
            f"choose one of {', '.join(VARIANTS)}"
        )
    if mf.NORM not in SUPPORTED_NORMS:
        raise ValueError(
            f"MODEL.MOBILEFORMER.NORM={mf.NORM!r} is not supported: Mobile-Former's convolutions take one of "
            f"{', '.join(SUPPORTED_NORMS)} (batch norms: the authors' weights carry batch-norm statistics, and "
            f"the padding masks assume a per-channel affine norm)")
    if input_shape.channels != 3:
        raise ValueError(f"Mobile-Former takes 3-channel RGB input, got {input_shape.channels} channels")
    return MobileFormer(
        VARIANTS[mf.VARIANT], out_features=mf.OUT_FEATURES, norm=mf.NORM,
        drop_path=mf.DROP_PATH_RATE, freeze_at=mf.FREEZE_AT,
    )
