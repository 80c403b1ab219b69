"""The neck: the backbone's maps to the decoder's memory, and its deployed (factored) form."""
import torch
from detectron2.layers import get_norm
from torch import nn

__all__ = ["Neck"]


class Neck(nn.Module):
    """1x1 conv + channel LayerNorm per backbone level to the decoder width, and ``num_extra``
    stride-2 3x3 convs on the last map for coarser levels (Deformable DETR's input projection);
    each level gets its level embedding and is flattened into the memory.

    Deformable DETR normalises with GroupNorm, whose statistics run over the whole padded map;
    a per-position LayerNorm keeps an image's features independent of the batch's padding.

    After :meth:`convert_to_deploy` the neck gives the memory in factored form
    (``factored_memory.py``), which only the memory's readers (``MemoryLinear``) take.
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
        levels = [norm(conv(x)) for (conv, norm), x in zip(self.lateral, maps)] + self._extra_levels(maps[-1], mask_fn)
        # The level embedding is added to the features themselves: the decoder and the proposal
        # heads read them without positions (deformable attention samples each level apart).
        memory = [x.flatten(2).transpose(1, 2) + level_embed[lvl].to(x.dtype) for lvl, x in enumerate(levels)]
        return torch.cat(memory, 1), [tuple(x.shape[-2:]) for x in levels]

    def _factors(self, maps, mask_fn):
        """The deployed form: a lateral level narrower than the memory as ``[x * r, r, 1]``
        ``[N, C_l + 2, H_l, W_l]`` (``r``: the reciprocal standard deviation its LayerNorm divides
        by at each position), any other level as ``[y, 1]`` ``[N, dim + 1, H_l, W_l]`` with ``y``
        the normalised level; each flattened."""
        factors = []
        for lvl, ((conv, norm), x) in enumerate(zip(self.lateral, maps)):
            if str(lvl) in self.variance:
                # |R [x; 1]|^2 / dim is the variance over the conv's output channels: a product with
                # R's C_l + 1 rows instead of the conv's dim, and a sum of squares (no cancellation)
                variance = self.variance[str(lvl)](x).pow(2).sum(1, keepdim=True) / norm.weight.shape[0]
                r = torch.rsqrt(variance + norm.eps)
                factors.append(torch.cat([x * r, r, torch.ones_like(r)], 1))
            else:
                factors.append(_with_ones(norm(conv(x))))
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
