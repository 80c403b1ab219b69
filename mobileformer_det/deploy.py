"""MF-DETR outside the training code: a tensor-in, tensor-out detector for export, ONNX export, and
a predictor that runs one of four runtimes (PyTorch eager, torch.compile, ONNX Runtime, OpenVINO)
and returns the same Detectron2 ``Instances`` whichever it is.

The contract of the tensor runtimes: the network sees ``images`` ``[N, 3, H, W]`` float32 RGB in
0-255, H and W fixed when exported, and ``image_sizes`` ``[N, 2]`` int64, the (h, w) of the valid
top-left part of each image. Everything outside it is masked out inside the network exactly as
evaluation masks the padding of a batch, so the graph computes evaluation's detections for any image
that fits: :class:`Predictor` resizes an image as evaluation does (``INPUT.MIN_SIZE_TEST`` /
``MAX_SIZE_TEST``), places it at the top left of the fixed canvas and passes its size. An image
larger than the canvas after that resize is shrunk to fit (logged: its detections then differ from
evaluation's). A graph exported ``masked=False`` takes ``images`` only and sees the padding: its
detections on images that do not fill the canvas are approximate.
"""
import logging
import os

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model, detector_postprocess
from torch import nn

from .checkpoint import MobileFormerCheckpointer
from .modeling.backbone.layers import valid_mask, zero_padding
from .modeling.detr.postprocess import PostProcess

__all__ = ["TensorDetector", "export_onnx", "graph_runner", "Predictor", "RUNTIMES", "evaluated_input_size",
           "evaluate"]

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "compile", "onnxruntime", "openvino")


class TensorDetector(nn.Module):
    """MF-DETR from an image tensor to its top-k detections: :meth:`MFDETR.predict` and the tensor
    step of its post-processing (``PostProcess.forward``), what the exported graph computes.

    ``forward(images, image_sizes=None)``: ``images`` ``[N, 3, H, W]`` float32 RGB 0-255;
    ``image_sizes`` ``[N, 2]`` int64 (h, w) of each image's valid top-left part: the rest is
    padding, set to zero after normalisation and masked out as evaluation masks a padded batch's
    (None: every image fills ``H x W`` and no mask is built). Returns ``boxes [N, K, 4]`` (xyxy in
    pixels, clipped to the valid part), ``scores [N, K]`` (descending) and ``labels [N, K]``
    (int64, contiguous class index), K = ``MODEL.MF_DETR.TEST.TOPK``. The score threshold and NMS
    (``PostProcess.select``) are left to the caller (:class:`Predictor` applies them), so that the
    graph keeps fixed output shapes.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, image_sizes=None):
        m = self.model
        x = m.normalize(images)
        if image_sizes is None:
            sizes = torch.tensor([images.shape[-2:]], dtype=torch.float32, device=images.device).expand(images.shape[0], 2)
        else:
            x, sizes = zero_padding(x, valid_mask(image_sizes, 1, *images.shape[-2:])), image_sizes.float()
        logits, boxes = m.predict(x, image_sizes)
        return m.postprocess(logits, boxes, sizes)


def load_model(cfg):
    """Build the detector of ``cfg``, load ``MODEL.WEIGHTS`` (variant checked) and prepare it for
    inference: MF-DETR deployed (``MFDETR.deploy``: batch norm and neck folded; channels-last
    backbone), Detectron2's RetinaNet and Faster R-CNN in eval mode."""
    model = build_model(cfg)
    MobileFormerCheckpointer(model, variant=cfg.MODEL.MOBILEFORMER.VARIANT).load(cfg.MODEL.WEIGHTS)
    return model.deploy() if hasattr(model, "deploy") else model.eval()


def export_onnx(model, path, height, width, dynamic_batch=False, opset=17, masked=True):
    """Write ``TensorDetector(model)`` as ONNX for ``height x width`` inputs and check it with
    ``onnx.checker``; returns ``path``. Inputs ``images`` and, when ``masked``, ``image_sizes``
    (see the module's docstring); outputs ``boxes``, ``scores``, ``labels``. The graph's metadata
    records the detector's class count (``mfdet.num_classes``), which :class:`Predictor` checks
    against its config.

    ``model`` is an MF-DETR, plain or deployed: it is deployed here (``MFDETR.deploy``) with its
    backbone in contiguous memory (channels last would only add transposes to the graph).
    """
    import onnx

    model.deploy(channels_last=False)
    example = (torch.zeros(1, 3, height, width, device=model.device),)
    inputs = ["images"]
    if masked:
        example += (torch.tensor([[height, width]], device=model.device),)
        inputs.append("image_sizes")
    axes = {name: {0: "batch"} for name in inputs + ["boxes", "scores", "labels"]} if dynamic_batch else None
    with torch.no_grad():
        torch.onnx.export(TensorDetector(model), example, path, input_names=inputs,
                          output_names=["boxes", "scores", "labels"], opset_version=opset,
                          dynamic_axes=axes, dynamo=False)
    graph = onnx.load(path)
    onnx.helper.set_model_props(graph, {"mfdet.num_classes": str(model.num_classes)})
    onnx.checker.check_model(graph)
    onnx.save(graph, path)
    return path


def evaluated_input_size(cfg):
    """The graph size that shows every image of ``cfg.DATASETS.TEST`` at evaluation's size: the
    largest height and the largest width that ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST`` resize its
    images to, each rounded up to a multiple of 32 (the datasets must be registered).

    Returns ((H, W), the set of (h, w) resized image sizes). Raises ``ValueError`` without a test
    dataset or when its records lack ``height``/``width``."""
    if not cfg.DATASETS.TEST:
        raise ValueError("the config has no DATASETS.TEST to size the graph from: pass --input-size H W")
    sizes = set()
    for name in cfg.DATASETS.TEST:
        for record in DatasetCatalog.get(name):
            if "height" not in record or "width" not in record:
                raise ValueError(f"{name!r}: an image record has no height/width to size the graph from: "
                                 f"pass --input-size H W")
            sizes.add(T.ResizeShortestEdge.get_output_shape(record["height"], record["width"], cfg.INPUT.MIN_SIZE_TEST,
                                                            cfg.INPUT.MAX_SIZE_TEST))
    if not sizes:
        raise ValueError(f"DATASETS.TEST {cfg.DATASETS.TEST} has no image to size the graph from: pass --input-size H W")
    return tuple(-(-max(s[i] for s in sizes) // 32) * 32 for i in (0, 1)), sizes


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


def graph_feed(masked, batch, sizes=None):
    """The inputs of an exported graph, in its order: ``[batch]``, and for a masked MF-DETR graph
    ``image_sizes`` (``sizes``, ``[N, 2]``; None: every image fills the batch's H x W)."""
    if not masked:
        return [batch]
    if sizes is None:
        sizes = [batch.shape[-2:]] * batch.shape[0]
    return [batch, np.asarray(sizes, dtype=np.int64).reshape(-1, 2)]


def _onnx_session(path, threads):
    session = onnx_session(path, threads)
    names = [i.name for i in session.get_inputs()]
    return lambda batch, sizes=None: session.run(None, dict(zip(names, graph_feed("image_sizes" in names, batch, sizes))))


def _openvino_model(path, threads):
    import openvino as ov

    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    outputs = list(compiled.outputs)  # MF-DETR's graph: boxes, scores, labels
    # fed by position: OpenVINO may call an input that goes straight into one node by that node's name
    masked = any("image_sizes" in i.get_names() for i in compiled.inputs)

    def run(batch, sizes=None):
        result = compiled(graph_feed(masked, batch, sizes))
        return [result[o] for o in outputs]
    return run


def graph_runner(path, runtime, threads):
    """A function running the exported graph at ``path`` with ``runtime`` ("onnxruntime" or
    "openvino") on the CPU: (``[N, 3, H, W]`` float32 array, optional ``[N, 2]`` valid sizes for a
    masked graph) -> its outputs as arrays ([boxes, scores, labels] for MF-DETR's graph)."""
    return (_onnx_session if runtime == "onnxruntime" else _openvino_model)(path, threads)


def graph_signature(path):
    """((H, W) of the ``images`` input, whether the graph takes ``image_sizes``) of an exported graph."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    return (dims[2].dim_value, dims[3].dim_value), any(i.name == "image_sizes" for i in graph.input)


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

    Every runtime first resizes the image as evaluation does (``INPUT.MIN_SIZE_TEST`` /
    ``MAX_SIZE_TEST``) and scales the boxes back as evaluation does (``detector_postprocess``).

    - ``torch``: the Detectron2 model (``MFDETR.deploy``: batch norm and neck folded,
      channels-last backbone), padded to a multiple of 32 and masked, as in evaluation.
    - ``compile``: :class:`TensorDetector` under ``torch.compile`` at ``input_size`` (default:
      :func:`evaluated_input_size`), masked.
    - ``onnxruntime``, ``openvino``: the graph at ``onnx_path`` (written by :func:`export_onnx`),
      at its own input size, on the CPU.

    The tensor runtimes place the resized image at the top left of their fixed canvas (see the
    module's docstring); a masked one then computes what evaluation computes.
    """

    def __init__(self, cfg, runtime="torch", onnx_path=None, input_size=None, threads=None):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        self.runtime = runtime
        self.postprocess = PostProcess.from_config(cfg)  # the graph's second step (the model has its own)
        self.fill = tuple(cfg.MODEL.PIXEL_MEAN)  # the canvas's colour (zero after normalisation)
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.masked, self._warned = True, False
        threads = threads or torch.get_num_threads()
        if runtime in ("onnxruntime", "openvino"):
            if not onnx_path or not os.path.exists(onnx_path):
                raise FileNotFoundError(f"--runtime {runtime} needs --onnx model.onnx (tools/export_onnx.py writes it); "
                                        f"got {onnx_path!r}")
            check_graph_classes(onnx_path, cfg.MODEL.MF_DETR.NUM_CLASSES)
            self.input_size, self.masked = graph_signature(onnx_path)
            if not self.masked:
                logger.warning(f"{onnx_path!r} was exported without image_sizes (unmasked): it sees the canvas's "
                               f"padding, so its detections on images that do not fill {self.input_size} only "
                               f"approximate evaluation's")
            self._run = graph_runner(onnx_path, runtime, threads)
            return
        self.model = load_model(cfg)
        if runtime == "compile":
            self.input_size = tuple(input_size) if input_size else evaluated_input_size(cfg)[0]
            compiled = torch.compile(TensorDetector(self.model), dynamic=False)

            def run(batch, sizes):
                with torch.no_grad():
                    out = compiled(torch.from_numpy(batch).to(self.device), torch.as_tensor(sizes, device=self.device))
                return [t.cpu().numpy() for t in out]
            try:  # compile now (the first call), so that a missing compiler is reported here
                run(np.zeros((1, 3, *self.input_size), dtype=np.float32), [self.input_size])
            except Exception as e:
                raise RuntimeError(f"torch.compile failed here ({type(e).__name__}: {str(e).splitlines()[0]}); "
                                   f"use --runtime torch, or onnxruntime with an exported graph") from e
            self._run = run

    def __call__(self, rgb):
        """``rgb``: ``[H, W, 3]`` uint8. Returns ``Instances`` at ``(H, W)``."""
        height, width = rgb.shape[:2]
        image = self.resize.get_transform(rgb).apply_image(rgb)
        if self.runtime == "torch":
            inputs = {"image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))), "height": height,
                      "width": width}
            with torch.no_grad():
                return self.model([inputs])[0]["instances"].to("cpu")
        batch, size = to_canvas(image, self.input_size, self.fill)
        if size != image.shape[:2] and not self._warned:
            logger.warning(f"an image of {image.shape[0]}x{image.shape[1]} after the test resize does not fit the "
                           f"network's {self.input_size[0]}x{self.input_size[1]}: shrunk to fit, so its detections "
                           f"differ from evaluation's (export with tools/export_onnx.py's default --input-size)")
            self._warned = True
        boxes, scores, labels = (torch.as_tensor(np.asarray(t)[0]) for t in self._run(batch, [size]))
        found = self.postprocess.select(boxes.float(), scores.float(), labels.long(), size)
        return detector_postprocess(found, height, width)


def to_canvas(image, size, fill):
    """A test-resized ``image [h, w, 3]`` uint8 as the graph's input: shrunk to fit ``size`` = (H, W)
    when larger (:func:`fit`), then :func:`place`-d. Returns (``[1, 3, H, W]`` float32, (h', w'))."""
    if image.shape[0] > size[0] or image.shape[1] > size[1]:
        image = fit(image, size)
    return place(image, size, fill)


def fit(rgb, size):
    """``rgb [h, w, 3]`` uint8 resized to fit inside ``size`` = (H, W), the aspect ratio kept."""
    h, w = rgb.shape[:2]
    scale = min(size[0] / h, size[1] / w)
    new_h, new_w = min(size[0], max(1, int(round(h * scale)))), min(size[1], max(1, int(round(w * scale))))
    return T.ResizeTransform(h, w, new_h, new_w).apply_image(rgb)


def place(rgb, size, fill):
    """``rgb [h, w, 3]`` uint8 (at most ``size``) at the top left of an ``size`` = (H, W) canvas of
    colour ``fill``. Returns (``[1, 3, H, W]`` float32 array, (h, w))."""
    h, w = rgb.shape[:2]
    canvas = np.empty((*size, 3), dtype=np.float32)
    canvas[...] = np.asarray(fill, dtype=np.float32)
    canvas[:h, :w] = rgb
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)[None]), (h, w)


def evaluate(cfg, predictor, dataset_name, output_dir=None):
    """COCO box metrics (``COCOEvaluator``'s dict: AP, AP50, ...) of a :class:`Predictor` on the
    registered ``dataset_name``: each image read as the test loader reads it (``INPUT.FORMAT``
    RGB), given to the predictor (which resizes it as evaluation does), all its detections above
    ``MODEL.MF_DETR.TEST.SCORE_THRESH`` scored, as the trainer's evaluation scores the model."""
    from detectron2.data import build_detection_test_loader
    from detectron2.data.detection_utils import read_image
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    loader = build_detection_test_loader(DatasetCatalog.get(dataset_name), mapper=lambda record: record, num_workers=0)
    evaluator = COCOEvaluator(dataset_name, tasks=("bbox",), distributed=False, output_dir=output_dir)

    def model(inputs):
        return [{"instances": predictor(read_image(x["file_name"], format=cfg.INPUT.FORMAT))} for x in inputs]
    return inference_on_dataset(model, loader, evaluator)["bbox"]
