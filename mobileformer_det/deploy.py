"""MF-DETR outside the training code: a tensor-in, tensor-out detector for export, ONNX export, and
a predictor that runs one of four runtimes (PyTorch eager, torch.compile, ONNX Runtime, OpenVINO)
and returns the same Detectron2 ``Instances`` whichever it is.

The fixed-size contract of the tensor runtimes: the network sees ``[N, 3, H, W]`` float32 RGB in
0-255 with no padding mask, H and W fixed when exported. An image of another size is letterboxed:
resized to fit inside H x W (aspect ratio kept, Detectron2's ``ResizeTransform``), placed at the top
left and padded with the ImageNet mean colour (zero after normalisation, as the eager model pads);
the boxes are scaled back. Eager PyTorch instead masks the padding out, so for letterboxed images
the runtimes agree to about the effect of that padding, and exactly when the image already has the
network's size after resizing.
"""
import logging
import os

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from torch import nn

from .checkpoint import MobileFormerCheckpointer
from .modeling.detr.postprocess import PostProcess

__all__ = ["TensorDetector", "export_onnx", "graph_runner", "Predictor", "RUNTIMES"]

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "compile", "onnxruntime", "openvino")


class TensorDetector(nn.Module):
    """MF-DETR from an image tensor to its top-k detections: :meth:`MFDETR.predict` and the tensor
    step of its post-processing (``PostProcess.forward``), what the exported graph computes.

    ``forward(images [N, 3, H, W] float32 RGB 0-255)`` returns ``boxes [N, K, 4]`` (xyxy in input
    pixels, clipped to the image), ``scores [N, K]`` (descending) and ``labels [N, K]`` (int64,
    contiguous class index), K = ``MODEL.MF_DETR.TEST.TOPK``. No image is padded: no mask is built.
    The score threshold and NMS (``PostProcess.select``) are left to the caller
    (:class:`Predictor` applies them), so that the graph keeps fixed output shapes.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        m = self.model
        logits, boxes = m.predict(m.normalize(images))
        sizes = torch.tensor([images.shape[-2:]], dtype=torch.float32, device=images.device).expand(images.shape[0], 2)
        return m.postprocess(logits, boxes, sizes)


def load_model(cfg):
    """Build the detector of ``cfg``, load ``MODEL.WEIGHTS`` (variant checked) and prepare it for
    inference (``MFDETR.deploy``: batch norm and neck folded; channels-last backbone)."""
    model = build_model(cfg)
    MobileFormerCheckpointer(model, variant=cfg.MODEL.MOBILEFORMER.VARIANT).load(cfg.MODEL.WEIGHTS)
    return model.deploy()


def export_onnx(model, path, height, width, dynamic_batch=False, opset=17):
    """Write ``TensorDetector(model)`` as ONNX (input ``images``; outputs ``boxes``, ``scores``,
    ``labels``) for ``height x width`` inputs, check it with ``onnx.checker``; returns ``path``.
    The graph's metadata records the detector's class count (``mfdet.num_classes``), which
    :class:`Predictor` checks against its config.

    ``model`` is an MF-DETR, plain or deployed: it is deployed here (``MFDETR.deploy``) with its
    backbone in contiguous memory (channels last would only add transposes to the graph).
    """
    import onnx

    model.deploy(channels_last=False)
    example = torch.zeros(1, 3, height, width, device=model.device)
    axes = {name: {0: "batch"} for name in ("images", "boxes", "scores", "labels")} if dynamic_batch else None
    with torch.no_grad():
        torch.onnx.export(TensorDetector(model), (example,), path, input_names=["images"],
                          output_names=["boxes", "scores", "labels"], opset_version=opset,
                          dynamic_axes=axes, dynamo=False)
    graph = onnx.load(path)
    onnx.helper.set_model_props(graph, {"mfdet.num_classes": str(model.num_classes)})
    onnx.checker.check_model(graph)
    onnx.save(graph, path)
    return path


def onnx_session(path, threads, profile_prefix=None):
    """An ONNX Runtime CPU session for the graph at ``path`` on ``threads`` threads; with
    ``profile_prefix``, it records every node's time (``session.end_profiling()`` writes the JSON)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _onnx_session(path, threads):
    session = onnx_session(path, threads)
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})


def _openvino_model(path, threads):
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    outputs = list(compiled.outputs)  # MF-DETR's graph: boxes, scores, labels

    def run(batch):
        result = compiled(batch)
        return [result[o] for o in outputs]
    return run


def graph_runner(path, runtime, threads):
    """A function running the exported graph at ``path`` with ``runtime`` ("onnxruntime" or
    "openvino") on the CPU: ``[N, 3, H, W]`` float32 array -> its outputs as arrays ([boxes,
    scores, labels] for MF-DETR's graph)."""
    return (_onnx_session if runtime == "onnxruntime" else _openvino_model)(path, threads)


def onnx_input_size(path):
    """(H, W) of the ``images`` input of an exported graph."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    return dims[2].dim_value, dims[3].dim_value


def check_graph_classes(path, num_classes):
    """Raise ``ValueError`` when the graph at ``path`` was exported for another class count than
    ``num_classes`` (its labels would index past the dataset's class names)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    exported = props.get("mfdet.num_classes")
    if exported is not None and int(exported) != num_classes:
        raise ValueError(f"{path!r} was exported for {exported} classes, but the config has MODEL.MF_DETR.NUM_CLASSES "
                         f"{num_classes}: pass the config the graph was exported with, or export it again with this one")


class Predictor:
    """Run MF-DETR on RGB images with one of :data:`RUNTIMES`; returns ``Instances`` (``pred_boxes``
    in the image's pixels, ``scores``, ``pred_classes``), post-processed by the model's own
    ``PostProcess`` (``MODEL.MF_DETR.TEST``: top-k, score threshold, NMS) whichever the runtime.

    - ``torch``: the Detectron2 model (``MFDETR.deploy``: batch norm and neck folded, channels-last backbone), any image size,
      Detectron2's test-time resize (``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``).
    - ``compile``: :class:`TensorDetector` under ``torch.compile`` at ``input_size``.
    - ``onnxruntime``, ``openvino``: the graph at ``onnx_path`` (written by :func:`export_onnx`),
      at its own input size, on the CPU.

    The tensor runtimes letterbox each image into their fixed size (see the module's docstring).
    """

    def __init__(self, cfg, runtime="torch", onnx_path=None, input_size=None, threads=None):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        self.runtime = runtime
        self.postprocess = PostProcess.from_config(cfg)  # the graph's second step (the model has its own)
        self.fill = tuple(cfg.MODEL.PIXEL_MEAN)  # letterbox colour: zero after normalisation
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.device = torch.device(cfg.MODEL.DEVICE)
        threads = threads or torch.get_num_threads()
        if runtime in ("onnxruntime", "openvino"):
            if not onnx_path or not os.path.exists(onnx_path):
                raise FileNotFoundError(f"--runtime {runtime} needs --onnx model.onnx (tools/export_onnx.py writes it); "
                                        f"got {onnx_path!r}")
            check_graph_classes(onnx_path, cfg.MODEL.MF_DETR.NUM_CLASSES)
            self.input_size = onnx_input_size(onnx_path)
            if min(self.input_size) < cfg.INPUT.MIN_SIZE_TEST:
                logger.warning(
                    f"{onnx_path!r} takes {self.input_size[0]}x{self.input_size[1]} images: they are shown to it at most "
                    f"{min(self.input_size)} px on their shorter side, but evaluation resizes them to "
                    f"{cfg.INPUT.MIN_SIZE_TEST} (INPUT.MIN_SIZE_TEST), so it detects on smaller images than were "
                    f"evaluated. Export at least {cfg.INPUT.MIN_SIZE_TEST} px on the shorter side")
            self._run = graph_runner(onnx_path, runtime, threads)
            return
        self.model = load_model(cfg)
        if runtime == "compile":
            if input_size is None:
                raise ValueError("--runtime compile needs the network's input size (--input-size H W)")
            self.input_size = tuple(input_size)
            compiled = torch.compile(TensorDetector(self.model), dynamic=False)

            def run(batch):
                with torch.no_grad():
                    return [t.cpu().numpy() for t in compiled(torch.from_numpy(batch).to(self.device))]
            try:  # compile now (the first call), so that a missing compiler is reported here
                run(np.zeros((1, 3, *self.input_size), dtype=np.float32))
            except Exception as e:
                raise RuntimeError(f"torch.compile failed here ({type(e).__name__}: {str(e).splitlines()[0]}); "
                                   f"use --runtime torch, or onnxruntime with an exported graph") from e
            self._run = run

    def __call__(self, rgb):
        """``rgb``: ``[H, W, 3]`` uint8. Returns ``Instances`` at ``(H, W)``."""
        height, width = rgb.shape[:2]
        if self.runtime == "torch":
            image = self.resize.get_transform(rgb).apply_image(rgb)
            inputs = {"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))), "height": height,
                      "width": width}
            with torch.no_grad():
                return self.model([inputs])[0]["instances"].to("cpu")
        batch, scale = letterbox(rgb, self.input_size, self.fill)
        boxes, scores, labels = (torch.as_tensor(np.asarray(t)[0]) for t in self._run(batch))
        return self.postprocess.select((boxes / scale).float(), scores.float(), labels.long(), (height, width))


def letterbox(rgb, size, fill):
    """``rgb [h, w, 3]`` uint8 resized to fit in ``size`` = (H, W), aspect kept, top left, the rest
    ``fill``. Returns (``[1, 3, H, W]`` float32 array, the scale factor)."""
    h, w = rgb.shape[:2]
    height, width = size
    scale = min(height / h, width / w)
    new_h, new_w = min(height, int(round(h * scale))), min(width, int(round(w * scale)))
    image = rgb if (new_h, new_w) == (h, w) else T.ResizeTransform(h, w, new_h, new_w).apply_image(rgb)
    canvas = np.empty((height, width, 3), dtype=np.float32)
    canvas[...] = np.asarray(fill, dtype=np.float32)
    canvas[:new_h, :new_w] = image
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)[None]), scale
