"""FLOP counting with fvcore, plus handles for the ops fvcore does not know.

fvcore counts one multiply-add as one flop; so do the paper and the reference's table.
"""
from functools import reduce
from operator import mul

from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape


def _sdpa_flop_jit(inputs, outputs):
    """``softmax(q @ k^T) @ v`` with q ``[..., L, E]``, k ``[..., S, E]``, v ``[..., S, Ev]``: L*S*(E + Ev) per batch."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = reduce(mul, q[:-2], 1)
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


EXTRA_OP_HANDLES = {"aten::scaled_dot_product_attention": _sdpa_flop_jit}


def flop_count_analysis(model, inputs):
    """A ``FlopCountAnalysis`` that also counts scaled-dot-product attention; warnings silenced."""
    analysis = FlopCountAnalysis(model, inputs).set_op_handle(**EXTRA_OP_HANDLES)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis
