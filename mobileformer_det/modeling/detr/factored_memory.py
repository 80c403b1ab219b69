"""The layers that read the decoder's memory, and their deployed form: the neck's 1x1 conv and
LayerNorm folded into them (exact up to float rounding; ``docs/deploy.md`` has the derivation).

Level ``l`` of the memory is ``LN(conv(x_l)) + e_l`` (``x_l``: the backbone map, ``C_l`` channels;
``e_l``: the level embedding). With ``r`` the LayerNorm's reciprocal standard deviation at each
position and ``W_c``, ``b_c`` the conv's weight and bias less their means over the output channels
(LayerNorm subtracts that mean, which is linear in ``x``), it is ``M_l h_l`` for the factor
``h_l = [x_l * r, r, 1]`` (``C_l + 2`` channels) and ``M_l = [diag(gamma) W_c | diag(gamma) b_c | beta + e_l]``.
A linear layer ``W y + b`` of the memory is then ``W_l h_l`` per level, ``W_l = W M_l`` with ``b``
added to its last column: every value projection and the proposal projection cost
``S_l * (C_l + 2) * dim`` multiply-adds instead of ``S_l * dim * dim``, and the normalised memory
is never materialised. The neck (``neck.py``) computes ``h_l`` and ``M_l``; :class:`MemoryLinear`
holds ``W_l``.

The memory is whatever the neck gives, and only :class:`MemoryLinear` reads it: ``[N, S, dim]``
(every level's positions, flattened and concatenated) as built, a tuple of the per-level factors
``h_l`` ``[N, K_l, H_l * W_l]`` (channels first, as the maps are) once deployed.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MemoryLinear"]


class MemoryLinear(nn.Linear):
    """An ``nn.Linear(dim, out)`` that reads the decoder's memory, in either of its forms.

    ``forward(memory)`` gives the rows ``[N, S, out]``; ``forward(memory, spatial_shapes)`` gives
    them per level, channels first (as deformable attention samples them; in the deployed form one
    matrix product per level and no transpose). :meth:`convert_to_deploy` folds the neck's factors into the weight.
    ``bias`` stays the layer's bias in both forms: its output where the memory is zero.
    """

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        self.folded = None  # the deployed form's per-level weights W_l [out, K_l] (an nn.ParameterList)

    @torch.no_grad()
    def convert_to_deploy(self, factors):
        """Read the factored memory from now on. ``factors``: per level ``M_l`` ``[dim, K_l]``
        (float64) with ``memory_l = M_l h_l`` and ``h_l``'s last channel all ones."""
        weight, bias = self.weight.double(), self.bias.double()
        folded = []
        for M in factors:
            w = weight @ M.double()
            w[:, -1] += bias                                                     # the ones channel
            folded.append(nn.Parameter(w.to(self.weight.dtype), requires_grad=False))
        self.folded = nn.ParameterList(folded)
        del self.weight                        # the plain weight is gone: nothing can read [N, S, dim] rows
        self.bias.requires_grad_(False)

    def forward(self, memory, spatial_shapes=None):
        """Memory -> ``[N, S, out]``; with ``spatial_shapes`` (list of ``(H_l, W_l)``), the list over
        levels of ``[N, out, H_l * W_l]`` instead."""
        if self.folded is None:
            rows = super().forward(memory)
            if spatial_shapes is None:
                return rows
            return [v.transpose(1, 2) for v in rows.split([h * w for h, w in spatial_shapes], 1)]
        if spatial_shapes is None:
            return torch.cat([F.linear(h.transpose(1, 2), w.to(h.dtype)) for h, w in zip(memory, self.folded)], 1)
        return [torch.matmul(w.to(h.dtype), h) for h, w in zip(memory, self.folded)]
