"""INT8 graphs for the CPU: ONNX Runtime's static quantization (QDQ) of the exported graph,
calibrated on images of a registered dataset, with chosen parts of the network left in float.

The quantized graph has the fp32 graph's inputs and outputs (see deploy.py) and runs in ONNX
Runtime and OpenVINO like it (both read the QuantizeLinear / DequantizeLinear pairs). Only the
products are quantized (Conv, MatMul, Gemm: per output channel for weights, per tensor for
activations, unsigned 8 bits for activations and signed for weights, ONNX Runtime's choice for x86);
element-wise operations, softmax, layer norm and sampling stay in float. Each activation's range
is the central 99.99% of its calibration histogram, not its extremes (see CALIBRATION). Weights use
7 of their 8 bits (see quantize_graph), so that the graph gives the same detections on every x86 CPU.
"""
import logging
import os
import re
import tempfile

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T

__all__ = ["PARTS", "FLOAT_PARTS", "part_of", "quantize_graph", "calibration_images"]

logger = logging.getLogger(__name__)

# The network's parts, by the module path that torch.onnx writes into every node's name.
PARTS = {
    "bridges": r"/(mobile_to_former|former_to_mobile|final_mobile_to_former)/",  # the two-way cross-attention
    "backbone": r"/backbone/",                      # the rest of Mobile-Former: convolutions, dynamic ReLUs, Former
    "heads": r"/(class_heads|box_heads|pre_box_head|enc_class_head|enc_box_head)\.?",  # the proposals' and FDR anchors' too
    "decoder": r"/(transformer|neck|token_proj)/",  # neck, proposals' projection, decoder layers
}
OPS = ("Conv", "MatMul", "Gemm")
# Activations' ranges: the central 99.99% of each calibration histogram, 0.005% cut from each tail
# (ONNX Runtime's percentile calibration, asymmetric: its symmetric default histograms |x| on
# [0, max], which numpy cannot bin when an activation barely varies, e.g. 0.33332-0.33334). Min-max
# ranges let a few extreme activations of a trained backbone stretch the 8-bit grid: on the toy
# recipe's model with offsets they cost 2.0 AP, these ranges 0.2 (docs/deploy.md).
CALIBRATION = {"CalibPercentile": 99.99, "CalibTensorRangeSymmetric": False}
# Kept in float by default: none. Measured on the recipes' trained models (docs/deploy.md): the toy
# model loses 1.9 AP with everything quantized, 0.3 with the backbone in float (7-bit weights); the
# crowd model 1.4, 0.3 with the backbone in float (8-bit weights).
FLOAT_PARTS = ()


def part_of(node_name):
    """The part (a key of :data:`PARTS`) an exported node belongs to, the first that matches; None
    for the normalisation, masks and post-processing at the top level."""
    for part, pattern in PARTS.items():
        if re.search(pattern, node_name):
            return part
    return None


def calibration_images(dataset, num_images, seed=0):
    """Paths of ``num_images`` images of the registered ``dataset``, drawn without replacement with
    ``seed`` (all of them when it has fewer)."""
    records = DatasetCatalog.get(dataset)
    if not records:
        raise ValueError(f"the calibration dataset {dataset!r} has no images")
    order = np.random.RandomState(seed).permutation(len(records))[:num_images]
    return [records[i]["file_name"] for i in order]


class _Reader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol: the graph's feeds, one image at a time,
    prepared as :class:`~mobileformer_det.deploy.Predictor` prepares them."""

    def __init__(self, paths, cfg, input_size, input_names):
        from detectron2.data.detection_utils import read_image

        from .deploy import graph_feed, to_canvas

        resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        feeds = []
        for path in paths:
            rgb = read_image(path, format="RGB") if isinstance(path, str) else path  # as the test loader reads them
            batch, size = to_canvas(resize.get_transform(rgb).apply_image(rgb), input_size, tuple(cfg.MODEL.PIXEL_MEAN))
            feeds.append(dict(zip(input_names, graph_feed("image_sizes" in input_names, batch, [size]))))
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def _folded_activations(model):
    """Constants of ``model`` that are activations folded at export, not weights: with a batch of 1
    fixed, what the learned tokens and query embeddings compute before meeting the image is
    constant (``[1, heads, M, d]`` and the like). Quantized as weights, per channel along the
    wrong axis, they make OpenVINO refuse the graph ("Check 'any_of(scale.size(), OC, 1U)'
    failed"); a product that reads one stays in float."""
    rank = {i.name: len(i.dims) for i in model.graph.initializer}
    return {i for n in model.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input[:2] if rank.get(i, 2) != 2}


def quantize_graph(fp32_path, int8_path, cfg, images, float_parts=()):
    """Write the INT8 form of the exported graph at ``fp32_path`` to ``int8_path``.

    Args:
        cfg: the config the graph was exported with (test resize, pixel mean).
        images: image paths (or ``[h, w, 3]`` uint8 RGB arrays) to calibrate the activations'
            ranges on (the central 99.99% of each one's histogram over all of them).
        float_parts: keys of :data:`PARTS` whose products stay in float.
    Returns:
        ``int8_path``; the number of quantized and float products is logged.

    Weights are quantized to [-64, 64] (ONNX Runtime's ``reduce_range``): x86 CPUs without VNNI
    (AVX2, and AVX-512 before Cascade Lake) multiply unsigned 8-bit activations by signed 8-bit
    weights with ``vpmaddubsw``, which adds each pair of products into a saturating 16-bit sum;
    255 * 127 * 2 overflows it, 255 * 64 * 2 does not (OpenVINO's "saturation issue"; NNCF's
    ``overflow_fix`` is the same remedy). With full-range weights OpenVINO's INT8 of this network
    lost its detections on one CI host while the same graph was right on others; on an AVX2 host
    7 bits lose less AP than 8 (make toy's model: 1.9 against 4.0, docs/deploy.md).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .deploy import graph_signature

    unknown = set(float_parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}: choose among {list(PARTS)}")
    input_size, masked = graph_signature(fp32_path)
    graph = onnx.load(fp32_path)
    names = [i.name for i in graph.graph.input]
    with tempfile.TemporaryDirectory() as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)  # ONNX Runtime's advice before quantizing
        model = onnx.load(prepared)
        products = [n for n in model.graph.node if n.op_type in OPS]
        folded = _folded_activations(model)
        excluded = [n.name for n in products if part_of(n.name) in float_parts or set(n.input) & folded]
        quantize_static(prepared, int8_path, _Reader(images, cfg, input_size, names), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(OPS), per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, **CALIBRATION})
    quantized = onnx.load(int8_path)
    onnx.helper.set_model_props(quantized, {p.key: p.value for p in graph.metadata_props} |
                                {"mfdet.int8_float_parts": ",".join(float_parts)})
    onnx.save(quantized, int8_path)
    logger.info(f"quantized {len(products) - len(excluded)} of {len(products)} products to INT8 "
                f"(float: {', '.join(float_parts) or 'none'}), calibrated on {len(images)} images")
    return int8_path
