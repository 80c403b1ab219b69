"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch: ``grid_sample``, no compiled op."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .factored_memory import MemoryLinear


def multi_scale_deformable_attention(value, spatial_shapes, sampling_locations, attention_weights):
    """Bilinearly sample every level at the given locations and sum with the attention weights.

    Args:
        value: list over levels of ``[N, heads * C_h, H_l * W_l]``, the flattened maps, channels first.
        spatial_shapes: list of ``(H_l, W_l)``.
        sampling_locations: ``[N, Q, heads, L, P, 2]``, (x, y) in [0, 1] of the padded map.
        attention_weights: ``[N, Q, heads, L, P]``, softmax-normalised over L*P.
    Returns:
        ``[N, Q, heads * C_h]``.
    """
    n, q, heads, levels, points, _ = sampling_locations.shape
    ch = value[0].shape[1] // heads
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = value[lvl].reshape(n * heads, ch, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)                  # [N*heads, Q, P, 2]
        sampled.append(F.grid_sample(v, g.to(v.dtype), mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(sampled, dim=-2).flatten(-2)                          # [N*heads, C_h, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, q, levels * points)
    out = (sampled * weights.to(sampled.dtype)).sum(-1)                         # [N*heads, C_h, Q]
    return out.view(n, heads * ch, q).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Each query samples ``num_points`` locations per head and level around its reference point.

    With a reference box (cx, cy, w, h) the offsets are scaled by half its size, as in
    Deformable DETR with box refinement; with a reference point, by the level's map size.
    """

    def __init__(self, dim=256, num_levels=3, num_heads=8, num_points=4):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_levels, self.num_heads, self.num_points = num_levels, num_heads, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = MemoryLinear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self._reset_parameters()

    def _reset_parameters(self):
        # Offsets start on a ring of directions, one per head, growing with the point index.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query, reference, value, spatial_shapes, padding_mask=None):
        """
        Args:
            query: ``[N, Q, dim]`` (position embedding already added).
            reference: ``[N, Q, L, 2]`` points or ``[N, Q, L, 4]`` boxes, normalised to the padded map.
            value: ``[N, S, dim]`` flattened maps of all levels, or the neck's factored memory
                once deployed: ``value_proj`` (a ``MemoryLinear``) reads either.
            spatial_shapes: list of ``(H_l, W_l)``.
            padding_mask: ``[N, S]`` bool, True on padding (those values are zeroed).
        Returns:
            ``[N, Q, dim]``.
        """
        n, q, _ = query.shape
        sizes = [h * w for h, w in spatial_shapes]
        value = self.value_proj(value, spatial_shapes)                   # per level [N, dim, H_l * W_l]
        if padding_mask is not None:  # a multiply, not a select: runtimes broadcast it faster
            keep = (~padding_mask).to(value[0].dtype)[:, None]                  # [N, 1, S]
            value = [v * k for v, k in zip(value, keep.split(sizes, 2))]
        offsets = self.sampling_offsets(query).view(n, q, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).view(n, q, self.num_heads, self.num_levels * self.num_points)
        weights = weights.softmax(-1).view(n, q, self.num_heads, self.num_levels, self.num_points)
        ref = reference[:, :, None, :, None]                                     # [N, Q, 1, L, 1, 2|4]
        if reference.shape[-1] == 2:
            normaliser = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device)
            locations = ref + offsets / normaliser[None, None, None, :, None, :]
        else:
            locations = ref[..., :2] + offsets / self.num_points * ref[..., 2:] * 0.5
        out = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(out)
