"""FLOP counting with fvcore, plus handles for the ops fvcore does not know.

fvcore counts one multiply-add as one flop; so do the paper and the reference's table.
"""
from functools import reduce
from operator import mul

import torch
from detectron2.utils.analysis import FlopCountAnalysis as DetectorFlopCountAnalysis
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape


def _sdpa_flop_jit(inputs, outputs):
    """``softmax(q @ k^T) @ v`` with q ``[..., L, E]``, k ``[..., S, E]``, v ``[..., S, Ev]``: L*S*(E + Ev) per batch."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = reduce(mul, q[:-2], 1)
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _matmul_flop_jit(inputs, outputs):
    """``a @ b``: one multiply-add per output entry and entry of the reduced axis (``a``'s last).
    fvcore's handle counts the same for matrices but rejects a vector operand (``[..., K] @ [K]``:
    the expectation of D-FINE's distributions)."""
    return reduce(mul, get_shape(outputs[0]), 1) * get_shape(inputs[0])[-1]


EXTRA_OP_HANDLES = {"aten::scaled_dot_product_attention": _sdpa_flop_jit, "aten::matmul": _matmul_flop_jit}


def _quiet(analysis):
    analysis.set_op_handle(**EXTRA_OP_HANDLES)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis


def flop_count_analysis(model, inputs):
    """A ``FlopCountAnalysis`` of a tensor-in model that also counts scaled-dot-product attention;
    warnings silenced."""
    return _quiet(FlopCountAnalysis(model, inputs))


def detector_flops_by_module(model, height, width):
    """GFLOPs of a Detectron2 detector (list-of-dicts in, ``Instances`` out) on one ``height x width``
    image: ``(total, {module name: GFLOPs})`` with the model's own module names ("" = all).
    Detectron2's ``FlopCountAnalysis`` flattens the inputs and outputs for the tracer."""
    analysis = _quiet(DetectorFlopCountAnalysis(model, [{"image": torch.zeros(3, height, width, dtype=torch.uint8)}]))
    by_module = {}
    for name, flops in analysis.by_module().items():  # the tracing wrapper names the model "model"
        if name == "" or name == "model" or name.startswith("model."):
            by_module[name[len("model."):] if name.startswith("model.") else ""] = flops / 1e9
    return analysis.total() / 1e9, by_module
