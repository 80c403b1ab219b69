"""The neck: the backbone's maps to the decoder's memory, and its deployed (factored) form."""
import torch
from detectron2.layers import get_norm
from torch import nn

from .position_encoding import sine_embed_mask
from .transformer import FFN

__all__ = ["IntraScaleLayer", "Neck"]


class IntraScaleLayer(nn.Module):
    """RT-DETR's AIFI (attention-based intra-scale feature interaction) layer: multi-head
    self-attention over the positions of one map, the position encoding added to queries and keys,
    then the FFN, each with a residual and a LayerNorm (post-norm)."""

    def __init__(self, dim, ffn_dim, num_heads, dropout=0.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFN(dim, ffn_dim, dropout)

    def forward(self, x, pos, key_bias=None):
        """
        Args:
            x, pos: ``[N, S, dim]``, the map's positions and their encoding.
            key_bias: ``[N, S]`` added to the attention scores (0 inside the image, -inf on
                padding, which no position attends to), or None.
        Returns:
            ``[N, S, dim]``.
        """
        q = x + pos
        out = self.self_attn(q, q, x, key_padding_mask=key_bias, need_weights=False)[0]
        return self.ffn(self.norm(x + self.dropout(out)))


class Neck(nn.Module):
    """1x1 conv + channel LayerNorm per backbone level to the decoder width, and ``num_extra``
    stride-2 3x3 convs on the last map for coarser levels (Deformable DETR's input projection);
    each level gets its level embedding and is flattened into the memory.

    Deformable DETR normalises with GroupNorm, whose statistics run over the whole padded map;
    a per-position LayerNorm keeps an image's features independent of the batch's padding.

    With ``aifi_layers`` > 0 the last backbone level's projection is then encoded by that many
    :class:`IntraScaleLayer` (RT-DETR's AIFI on its coarsest map; ``ffn_dim``, ``num_heads``,
    ``dropout`` are theirs) before its level embedding; the extra levels still read the backbone's map.

    After :meth:`convert_to_deploy` the neck gives the memory in factored form
    (``factored_memory.py``), which only the memory's readers (``MemoryLinear``) take.
    """

    def __init__(self, in_channels, dim, num_extra=0, aifi_layers=0, ffn_dim=1024, num_heads=8, dropout=0.0):
        super().__init__()
        if aifi_layers < 0:
            raise ValueError(f"MODEL.MF_DETR.AIFI_LAYERS must be >= 0 (0 = off), got {aifi_layers}")
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, 1), get_norm("LN", dim)) for c in in_channels)
        extra_in = [in_channels[-1]] + [dim] * (num_extra - 1)
        self.extra = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, 3, stride=2, padding=1), get_norm("LN", dim)) for c in extra_in[:num_extra]
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.aifi = nn.ModuleList(IntraScaleLayer(dim, ffn_dim, num_heads, dropout) for _ in range(aifi_layers))
        self.variance = None  # deployed form: level -> 1x1 conv by R (an nn.ModuleDict)

    def forward(self, maps, level_embed, mask_fn=None):
        """
        Args:
            maps: list of ``[N, C_l, H_l, W_l]``, zero on padding.
            level_embed: ``[L, dim]``, added to every position of level ``l``.
            mask_fn: optional ``(stride multiplier, h, w) -> [N, 1, h, w]`` valid mask of an extra
                level, used to zero its padding before the next stride-2 conv reads it.
        Returns:
            (memory, spatial shapes): the memory ``[N, S, dim]`` of all levels' positions
            (``S = sum H_l * W_l``, the extra levels last), or after :meth:`convert_to_deploy`
            the tuple of its per-level factors ``[N, K_l, H_l * W_l]``; the list of ``(H_l, W_l)``.
        """
        if self.variance is not None:
            return self._factors(maps, mask_fn)
        levels = [self._lateral(lvl, x, mask_fn) for lvl, x in enumerate(maps)] + self._extra_levels(maps[-1], mask_fn)
        # The level embedding is added to the features themselves: the decoder and the proposal
        # heads read them without positions (deformable attention samples each level apart).
        memory = [x.flatten(2).transpose(1, 2) + level_embed[lvl].to(x.dtype) for lvl, x in enumerate(levels)]
        return torch.cat(memory, 1), [tuple(x.shape[-2:]) for x in levels]

    def _factors(self, maps, mask_fn):
        """The deployed form: a lateral level narrower than the memory as ``[x * r, r, 1]``
        ``[N, C_l + 2, H_l, W_l]`` (``r``: the reciprocal standard deviation its LayerNorm divides
        by at each position), any other level as ``[y, 1]`` ``[N, dim + 1, H_l, W_l]`` with ``y``
        the level (normalised, and encoded with AIFI); each flattened."""
        factors = []
        for lvl, ((conv, norm), x) in enumerate(zip(self.lateral, maps)):
            if str(lvl) in self.variance:
                # |R [x; 1]|^2 / dim is the variance over the conv's output channels: a product with
                # R's C_l + 1 rows instead of the conv's dim, and a sum of squares (no cancellation)
                variance = self.variance[str(lvl)](x).pow(2).sum(1, keepdim=True) / norm.weight.shape[0]
                r = torch.rsqrt(variance + norm.eps)
                factors.append(torch.cat([x * r, r, torch.ones_like(r)], 1))
            else:
                factors.append(_with_ones(self._lateral(lvl, x, mask_fn)))
        factors += [_with_ones(y) for y in self._extra_levels(maps[-1], mask_fn)]
        return tuple(f.flatten(2) for f in factors), [tuple(f.shape[-2:]) for f in factors]

    @torch.no_grad()
    def convert_to_deploy(self, level_embed):
        """Give the memory in factored form from now on, and return ``M_l`` ``[dim, K_l]``
        (float64) of each level, with ``memory_l = M_l factor_l`` at every position (see
        ``factored_memory.py``), for the memory's readers. The lateral levels that have fewer
        channels than the memory (C_l + 2 <= dim) are factored; the other levels are their own
        factors (``M_l = [I | e_l]``). Changes no weight of the trained model."""
        dim = level_embed.shape[1]
        embed = level_embed.double()
        eye = torch.eye(dim, dtype=torch.float64, device=level_embed.device)
        self.variance = nn.ModuleDict()
        factors = []
        for lvl, (conv, norm) in enumerate(self.lateral):
            weight = conv.weight.double().flatten(1)                              # [dim, C_l]
            if weight.shape[1] + 2 > dim or self._encoded(lvl):
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

    def _encoded(self, lvl):
        """Whether AIFI encodes lateral level ``lvl`` (the last one, when it is on)."""
        return len(self.aifi) > 0 and lvl == len(self.lateral) - 1

    def _lateral(self, lvl, x, mask_fn):
        """Lateral level ``lvl`` of backbone map ``x``: ``[N, dim, H_l, W_l]``, normalised, and
        encoded by AIFI when it is the last (``mask_fn(1, h, w)`` gives its valid positions)."""
        conv, norm = self.lateral[lvl]
        y = norm(conv(x))
        if not self._encoded(lvl):
            return y
        n, c, h, w = y.shape
        valid = None if mask_fn is None else mask_fn(1, h, w)[:, 0]                     # [N, h, w] bool
        padding = torch.zeros(n, h, w, dtype=torch.bool, device=y.device) if valid is None else ~valid
        pos = sine_embed_mask(padding, c // 2).to(y.dtype).flatten(2).transpose(1, 2)   # [N, hw, dim]
        # log(1) = 0, log(0) = -inf: padded keys get no weight (as the backbone's bridges mask)
        key_bias = None if valid is None else valid.flatten(1).to(y.dtype).log()
        out = y.flatten(2).transpose(1, 2)
        for layer in self.aifi:
            out = layer(out, pos, key_bias)
        return out.transpose(1, 2).reshape(n, c, h, w)

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
