"""The three block types of Mobile-Former's variants (``lite``, ``down``, ``mf``; in the authors' code,
github.com/AAboys/MobileFormer, ``DnaBlock`` is ``mf`` and ``DnaBlock3`` is ``down`` and ``lite``).

Every block maps ``(x [N, C_in, H, W], tokens [N, M, d])`` to
``(x [N, C_out, H/s, W/s], tokens [N, M, d])``. With ``masks = (mask_in, mask_out)`` (``[N, 1, H, W]``
and ``[N, 1, H/s, W/s]``, 1 inside the image and 0 on padding) padded positions are zeroed before
every spatial convolution and left out of Mobile->Former, so a padded image gives the same
result as the image alone; ``masks=None`` is the reference's computation.
"""
import torch.nn.functional as F
from torch import nn

from .bridge import Former, FormerToMobile, MobileToFormer
from .layers import DropPath, DynamicReLU, channel_shuffle, conv_norm, zero_padding


class LiteBottleneck(nn.Module):
    """Depthwise 3x3 (channel multiplier ``expand``, stride s) + ReLU6, pointwise linear projection.

    No bridge: the tokens pass through unchanged. Shortcut when the shape is kept.
    """

    def __init__(self, in_channels, out_channels, stride, expand, groups=1, norm="BN", **_):
        super().__init__()
        self.shuffle_groups = in_channels if groups > 1 else 0
        self.use_shortcut = stride == 1 and in_channels == out_channels
        self.dw = conv_norm(in_channels, in_channels * expand, 3, stride, groups=in_channels, norm=norm)
        self.pw = conv_norm(in_channels * expand, out_channels, 1, groups=groups, norm=norm)

    def forward(self, x, tokens, masks=(None, None)):
        out = F.relu6(self.dw(zero_padding(x, masks[0])))
        if self.shuffle_groups:
            out = channel_shuffle(out, self.shuffle_groups)
        out = self.pw(out)
        if self.use_shortcut:
            out = out + x
        return out, tokens


class _BridgedBlock(nn.Module):
    """The bridge part common to both Mobile-Former blocks: Mobile->Former, then the Former.

    Mobile->Former reads the block's *input*; Mobile<-Former writes into its output.
    """

    def __init__(self, in_channels, out_channels, token_dim, bridge_heads, former_heads, drop_path):
        super().__init__()
        self.mobile_to_former = MobileToFormer(in_channels, token_dim, bridge_heads, drop_path)
        self.former = Former(token_dim, former_heads, drop_path=drop_path)
        self.former_to_mobile = FormerToMobile(out_channels, token_dim, bridge_heads, drop_path)
        self.drop_path = DropPath(drop_path)


class MobileFormerBlock(_BridgedBlock):
    """The stride-1 Mobile-Former block (reference ``DnaBlock``).

    Mobile: pw expand (x ``expand``) -> dynamic ReLU -> dw 3x3 -> dynamic ReLU -> pw linear,
    identity shortcut, then Mobile<-Former on the sum (the reference's gbr_before_skip=False).
    """

    def __init__(self, in_channels, out_channels, stride, expand, token_dim, groups=1, norm="BN",
                 bridge_heads=2, former_heads=4, drop_path=0.0, **_):
        super().__init__(in_channels, out_channels, token_dim, bridge_heads, former_heads, drop_path)
        hidden = round(in_channels * expand)
        self.groups = groups
        self.use_shortcut = stride == 1 and in_channels == out_channels
        self.expand = conv_norm(in_channels, hidden, 1, groups=groups, norm=norm)
        self.expand_act = DynamicReLU(hidden, token_dim)
        self.dw = conv_norm(hidden, hidden, 3, stride, groups=hidden, norm=norm)
        self.dw_act = DynamicReLU(hidden, token_dim)
        self.project = conv_norm(hidden, out_channels, 1, groups=groups, norm=norm)

    def _shuffle(self, x):
        return channel_shuffle(x, self.groups) if self.groups > 1 else x

    def forward(self, x, tokens, masks=(None, None)):
        tokens = self.former(self.mobile_to_former(x, tokens, masks[0]))
        out = self.expand_act(self._shuffle(self.expand(x)), tokens)
        out = self.dw_act(self.dw(zero_padding(out, masks[0])), tokens)
        out = self._shuffle(self.project(out))
        if self.use_shortcut:
            out = self.drop_path(out) + x
        return self.former_to_mobile(out, tokens), tokens


class MobileFormerDownBlock(_BridgedBlock):
    """The downsampling Mobile-Former block (reference ``DnaBlock3``).

    Mobile: dw 3x3 stride s (multiplier ``expand``) -> dynamic ReLU -> pw to C_out, then an inner
    residual unit dw 3x3 (multiplier ``expand2``) -> dynamic ReLU -> pw linear, added to its input;
    Mobile<-Former acts on that sum. A shortcut around the whole block only when the shape is kept.
    """

    def __init__(self, in_channels, out_channels, stride, expand, token_dim, expand2=4, groups=1,
                 norm="BN", bridge_heads=2, former_heads=4, drop_path=0.0, **_):
        super().__init__(in_channels, out_channels, token_dim, bridge_heads, former_heads, drop_path)
        hidden1 = round(in_channels * expand)
        hidden2 = round(out_channels * expand2)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups = groups
        self.use_shortcut = stride == 1 and in_channels == out_channels
        self.dw1 = conv_norm(in_channels, hidden1, 3, stride, groups=in_channels, norm=norm)
        self.dw1_act = DynamicReLU(hidden1, token_dim)
        self.pw1 = conv_norm(hidden1, out_channels, 1, groups=groups, norm=norm)
        self.dw2 = conv_norm(out_channels, hidden2, 3, 1, groups=out_channels, norm=norm)
        self.dw2_act = DynamicReLU(hidden2, token_dim)
        self.pw2 = conv_norm(hidden2, out_channels, 1, groups=groups, norm=norm)

    def forward(self, x, tokens, masks=(None, None)):
        tokens = self.former(self.mobile_to_former(x, tokens, masks[0]))
        out = self.dw1(zero_padding(x, masks[0]))
        if self.groups > 1:
            out = channel_shuffle(out, self.in_channels)
        mid = self.pw1(self.dw1_act(out, tokens))
        out = self.dw2(zero_padding(mid, masks[1]))
        if self.groups > 1:
            out = channel_shuffle(out, self.out_channels)
        out = self.pw2(self.dw2_act(out, tokens))
        out = self.former_to_mobile(self.drop_path(out) + mid, tokens)
        if self.use_shortcut:
            out = out + x
        return out, tokens


BLOCK_TYPES = {"lite": LiteBottleneck, "down": MobileFormerDownBlock, "mf": MobileFormerBlock}
