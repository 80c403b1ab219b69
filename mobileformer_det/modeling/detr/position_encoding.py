"""Sine position encodings (DETR's): for feature maps with a padding mask, and for boxes."""
import math

import torch


def sine_embed_coords(coords, num_feats=128, temperature=10000):
    """Embed normalised coordinates in [0, 1].

    Args:
        coords: ``[..., k]`` (k = 2 for points, 4 for cxcywh boxes).
    Returns:
        ``[..., k * num_feats]``: for each coordinate, interleaved sin/cos of ``2*pi*coord / t^(2i/num_feats)``.
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = coords.float()[..., None] * (2 * math.pi) / dim_t                  # [..., k, F]
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
    return pos.flatten(-2)


def sine_embed_mask(mask, num_feats=128, temperature=10000):
    """DETR's 2-D sine encoding of a padded feature map, normalised by the valid (unpadded) extent.

    Args:
        mask: ``[N, H, W]`` bool, True on padding.
    Returns:
        ``[N, 2*num_feats, H, W]`` (y features first, then x).
    """
    not_mask = (~mask).float()
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps = 1e-6
    y = (y - 0.5) / (y[:, -1:, :] + eps)
    x = (x - 0.5) / (x[:, :, -1:] + eps)
    pos = sine_embed_coords(torch.stack([y, x], dim=-1), num_feats, temperature)  # [N, H, W, 2F]
    return pos.permute(0, 3, 1, 2)
