"""The decoder's memory in factored form, for inference: the neck's 1x1 conv and LayerNorm folded
into every linear layer that reads the memory (exact up to float rounding).

Level ``l`` of the memory is ``LN(conv(x_l)) + e_l`` (``x_l``: the backbone map, ``C_l`` channels;
``e_l``: the level embedding). With ``r`` the LayerNorm's reciprocal standard deviation at each
position and ``W_c``, ``b_c`` the conv's weight and bias less their means over the output channels
(LayerNorm subtracts that mean, which is linear in ``x``), it is ``M_l h_l`` for the factor
``h_l = [x_l * r, r, 1]`` (``C_l + 2`` channels) and ``M_l = [diag(gamma) W_c | diag(gamma) b_c | beta + e_l]``.
A linear layer ``W y + b`` of the memory is then ``W_l h_l`` per level, ``W_l = W M_l`` with ``b``
added to its last column: six value projections and the proposal projection each cost
``S_l * (C_l + 2) * dim`` multiply-adds instead of ``S_l * dim * dim``, and the normalised memory
is never materialised. ``r`` needs the variance over the conv's outputs, ``|W_c x + b_c|^2 / dim =
|R [x; 1]|^2 / dim`` with ``R`` the triangular factor of ``[W_c | b_c]`` (``C_l + 1`` rows, not
``dim``). An extra (stride-2 conv) level, or a lateral level not narrower than the memory, is its
own factor ``[y, 1]`` with ``M_l = [I | e_l]``. ``Neck.factorise`` computes ``R`` and ``M_l``;
``inference.fold_neck`` applies them.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FactoredMemory", "MemoryLinear"]


class FactoredMemory(tuple):
    """The memory ``[N, S, dim]`` as one factor per level, ``h_l`` ``[N, K_l, H_l * W_l]`` (channels
    first, as the maps are); the layers reading it hold ``M_l`` in their weights (:class:`MemoryLinear`)."""


class MemoryLinear(nn.Module):
    """``linear`` applied to a :class:`FactoredMemory`: one matrix product per level.

    Args:
        linear: the ``nn.Linear(dim, out)`` that read the memory.
        factors: per level ``M_l`` ``[dim, K_l]`` with ``memory_l = M_l h_l``, ``h_l``'s last channel all ones.
    ``forward(memory)`` returns the list of ``[N, out, H_l * W_l]``, equal to ``linear(memory)``
    split by level and transposed (channels first, as deformable attention samples them; in ONNX
    Runtime this saves a transpose of every level per decoder layer); with ``rows=True``,
    ``[N, H_l * W_l, out]``. ``bias`` is ``linear``'s bias: its output at a position whose memory is zero.
    """

    def __init__(self, linear, factors):
        super().__init__()
        weight, bias = linear.weight.detach().double(), linear.bias.detach().double()
        folded = []
        for M in factors:
            w = weight @ M.double()
            w[:, -1] += bias                                                     # the ones channel
            folded.append(nn.Parameter(w.to(linear.weight.dtype), requires_grad=False))
        self.weights = nn.ParameterList(folded)
        self.register_buffer("bias", linear.bias.detach().clone(), persistent=False)

    def forward(self, memory, rows=False):
        if rows:
            return [F.linear(h.transpose(1, 2), w.to(h.dtype)) for h, w in zip(memory, self.weights)]
        return [torch.matmul(w.to(h.dtype), h) for h, w in zip(memory, self.weights)]
