"""Checkpoints: the authors' (AAboys/MobileFormer) weights, and Detectron2's checkpointer with a variant check.

The reference state_dict is renamed key by key to this project's modules. The trunk goes under
``backbone.`` (the prefix of both :class:`MobileFormerClassifier` and the detector) and the
classifier head under ``head.``, which the detector ignores, as Detectron2 ignores the FC layer
of an ImageNet ResNet.
"""
import glob
import logging
import os
import pickle
import re
import shutil
import zipfile

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from .modeling.backbone import VARIANTS, mobile_former_classifier

__all__ = ["convert_official_state_dict", "load_official_checkpoint", "check_checkpoint_file", "MobileFormerCheckpointer",
           "remove_stale_temporaries"]

logger = logging.getLogger(__name__)

VARIANT_KEY = "mobileformer_variant"

# (pattern on the reference key, replacement); the first match wins.
_STEM_RULES = [
    (r"^tokens\.weight$", "backbone.tokens"),
    (r"^stem\.0\.weight$", "backbone.stem.weight"),
    (r"^stem\.1\.", "backbone.stem.norm."),
]
_BRIDGE_RULES = [
    (r"local_global\.alpha\.0\.", "mobile_to_former.gate."),
    (r"local_global\.layer_norm\.", "mobile_to_former.norm."),
    (r"local_global\.", "mobile_to_former."),
    (r"global_block\.channel_mlp\.", "former.proj."),
    (r"global_block\.layer_norm\.", "former.norm1."),
    (r"global_block\.ffn\.0\.", "former.ffn.fc1."),
    (r"global_block\.ffn\.2\.", "former.ffn.fc2."),
    (r"global_block\.ffn_norm\.", "former.norm2."),
    (r"global_block\.q\.", "former.q."),
    (r"global_local\.proj\.", "former_to_mobile.v."),
    (r"global_local\.k\.", "former_to_mobile.k."),
]
# Convolution + BN pairs: (reference Sequential, index of conv, index of BN) -> our module.
_LITE_CONVS = {("conv", "0"): "dw", ("conv", "1"): "dw.norm", ("conv", "4"): "pw", ("conv", "5"): "pw.norm"}
_MF_CONVS = {"conv1": "expand", "conv2": "dw", "conv3": "project", "hyper1": "expand_act", "hyper2": "dw_act"}
_DOWN_CONVS = {"conv1": "dw1", "conv2": "pw1", "conv3": "dw2", "conv4": "pw2", "hyper1": "dw1_act", "hyper3": "dw2_act"}
_HEAD_RULES = [
    (r"^classifier\.conv\.1\.", "head.conv."),
    (r"^classifier\.conv\.2\.", "head.conv.norm."),
    (r"^classifier\.fc\.0\.", "head.fc."),
    (r"^classifier\.fc\.1\.", "head.fc_norm."),
    (r"^classifier\.classifier\.1\.", "head.classifier."),
]


def _rename_bridge_key(key):
    for pattern, repl in _BRIDGE_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _rename_block_key(rest, block_type):
    """``rest`` is a reference key inside ``features.<i>.``; returns our key inside ``blocks.<i>.``."""
    bridge_key = _rename_bridge_key(rest)
    if bridge_key is not None:
        return bridge_key
    seq, idx, tail = rest.split(".", 2)
    if block_type == "lite":
        return f"{_LITE_CONVS[(seq, idx)]}.{tail}"
    table = _MF_CONVS if block_type == "mf" else _DOWN_CONVS
    module = table[seq]
    if seq.startswith("hyper"):  # hyper.0 / hyper.2 are the two Linear layers of the MLP
        return f"{module}.{ {'0': 'fc1', '2': 'fc2'}[tail.split('.', 1)[0]] }.{tail.split('.', 1)[1]}"
    return f"{module}.{tail}" if idx == "0" else f"{module}.norm.{tail}"


def _rename(key, block_types):
    for pattern, repl in _STEM_RULES + _HEAD_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    if key.startswith("local_global."):  # the final Mobile->Former after the last block
        return "backbone.final_" + _rename_bridge_key(key)
    m = re.match(r"^features\.(\d+)\.(.+)$", key)
    if m is None:
        return None
    i = int(m.group(1))
    if i >= len(block_types):
        return None
    try:
        return f"backbone.blocks.{i}.{_rename_block_key(m.group(2), block_types[i])}"
    except (KeyError, ValueError):
        return None


def _unwrap(checkpoint):
    """The state_dict inside a reference ``.pth.tar`` (raw, or under state_dict_ema/state_dict/model), unprefixed."""
    state_dict = checkpoint
    if isinstance(checkpoint, dict):
        for key in ("state_dict_ema", "state_dict", "model"):
            if key in checkpoint and isinstance(checkpoint[key], dict):
                state_dict = checkpoint[key]
                break
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError("the checkpoint holds no state_dict (expected a dict of tensors)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def convert_official_state_dict(state_dict, variant):
    """Rename a reference-implementation state_dict (AAboys/MobileFormer) to this project's keys.

    Args:
        state_dict: the reference checkpoint: a raw state_dict, or a dict holding one under
            ``state_dict_ema``, ``state_dict`` or ``model``; a ``module.`` prefix is removed.
        variant: the variant it must be (``mf26`` ... ``mf508``).
    Returns:
        dict: ``backbone.*`` and ``head.*`` keys, exactly the state_dict of
        ``mobile_former_classifier(variant, num_classes)``.
    Raises:
        ValueError: naming the variant and every missing, unexpected or mis-shaped key.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown Mobile-Former variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    state_dict = _unwrap(state_dict)
    num_classes = state_dict["classifier.classifier.1.weight"].shape[0] \
        if "classifier.classifier.1.weight" in state_dict else 1000
    expected = mobile_former_classifier(variant, num_classes=num_classes).state_dict()
    block_types = [kind for kind, _, _, repeats, _, _ in VARIANTS[variant].blocks for _ in range(repeats)]

    converted, unexpected, mis_shaped = {}, [], []
    for key, value in state_dict.items():
        new_key = _rename(key, block_types)
        if new_key is None or new_key not in expected:
            unexpected.append(key)
        elif tuple(value.shape) != tuple(expected[new_key].shape):
            mis_shaped.append(f"{key}: {tuple(value.shape)} (expected {tuple(expected[new_key].shape)})")
        else:
            converted[new_key] = value
    missing = sorted(set(expected) - set(converted) - {k for k in expected if k.endswith("num_batches_tracked")})
    if unexpected or mis_shaped or missing:
        problems = []
        for label, keys in (("mis-shaped", mis_shaped), ("unexpected", unexpected), ("missing", missing)):
            if keys:
                problems.append(f"{len(keys)} {label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
        raise ValueError(
            f"this checkpoint is not a Mobile-Former {variant} of the reference implementation "
            f"(is it another variant?): " + "; ".join(problems)
        )
    return converted


def load_official_checkpoint(path, variant):
    """Read a reference ``.pth.tar`` from ``path`` and convert it (see :func:`convert_official_state_dict`)."""
    check_checkpoint_file(path)
    # The authors' files also pickle their training arguments, which a weights-only load refuses;
    # the file was checked above to be a PyTorch archive before anything is unpickled.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return convert_official_state_dict(checkpoint, variant)


def check_checkpoint_file(path):
    """Raise ``ValueError`` when ``path`` is not a file ``torch.save`` (or pickle) wrote, or a damaged one.

    A PyTorch file is a zip archive (``torch.save`` since PyTorch 1.6) or a pickle (older files and
    Detectron2's ``.pkl``). Anything else is named as such before it reaches ``torch.load``, whose
    own error for it suggests a less safe load.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path!r} is a damaged or truncated checkpoint (its zip archive is incomplete, "
                             f"{os.path.getsize(path)} bytes): copy or download it again")
    elif not head.startswith(b"\x80"):
        raise ValueError(f"{path!r} is not a PyTorch checkpoint (it starts with {head!r}; torch.save writes a zip "
                         f"archive): pass the model_final.pth of a training run, or a file of "
                         f"tools/convert_official_weights.py")


class MobileFormerCheckpointer(DetectionCheckpointer):
    """Detectron2's ``DetectionCheckpointer`` that

    - writes every file atomically (a temporary file renamed over the target), so a kill during a
      save never leaves a truncated checkpoint or ``last_checkpoint`` behind, and refuses to write
      weights that are not finite (a diverged run keeps its last good checkpoint);
    - records the backbone variant in every checkpoint and refuses to load one recorded for another
      variant (which would otherwise load with nothing but shape warnings);
    - refuses a detector checkpoint that does not fit the model (another class count, decoder
      depth or width), naming the keys and shapes on both sides, where Detectron2 would skip those
      tensors with a warning and go on with random ones. With ``fine_tune=True`` (a new training
      from ``MODEL.WEIGHTS``) the class heads alone may differ, in their class count: they start
      afresh, as when Detectron2 fine-tunes a COCO model on another dataset. A checkpoint of the
      backbone only (``tools/convert_official_weights.py``) loads into the detector's backbone (the
      FPN's bottom-up network for RetinaNet and Faster R-CNN);
    - loads a checkpoint's averaged weights (``"ema"``, written by a training with
      ``MODEL_EMA.ENABLED``) into the model, unless ``use_average=False`` (a resumed training, whose
      model gets its own weights back and its average, if it keeps one, its own): evaluation, the
      demo, export and a fine-tuning from ``MODEL.WEIGHTS`` start from the average, as D-FINE's
      evaluation and tuning do.
    """

    def __init__(self, model, save_dir="", *, variant=None, fine_tune=False, use_average=True, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.variant, self.fine_tune, self.use_average = variant, fine_tune, use_average
        self._file = ""  # the file being loaded, for the messages

    def save(self, name, **kwargs):
        """Write ``<name>.pth`` atomically and tag it ``last_checkpoint`` (the main process). In a
        training of several processes every process calls it at the same points (the trainer's
        hooks do), and when the write fails (non-finite weights, a full disk) all of them raise, so
        that none waits for the others in the next collective."""
        problem = None
        if self.save_dir and self.save_to_disk:
            try:
                self._save(name, **kwargs)
            except (FloatingPointError, OSError) as e:
                problem = e
        if comm.get_world_size() > 1:
            failed = next((p for p in comm.all_gather(None if problem is None else (type(problem), str(problem)))
                           if p is not None), None)
            if problem is None and failed is not None:
                problem = failed[0](f"on the main process: {failed[1]}")
        if problem is not None:
            raise problem

    def _save(self, name, **kwargs):
        data = {"model": self.model.state_dict()}
        bad = next((k for k, v in data["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise FloatingPointError(
                f"not saving {name}.pth: the weights are not finite ({bad} holds NaN or inf), the run has diverged. "
                f"The last good checkpoint is kept ({self.get_checkpoint_file() or 'none yet'}): lower "
                f"SOLVER.BASE_LR (or turn SOLVER.AMP.ENABLED off) and resume from it")
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        if self.variant is not None:
            data[VARIANT_KEY] = self.variant
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        previous = self.get_checkpoint_file() if self.has_checkpoint() else None
        try:
            _atomic_write(save_file, lambda f: torch.save(data, f))
            self.tag_last_checkpoint(basename)
        except OSError as e:
            usage = shutil.disk_usage(self.save_dir)
            kept = (f"{os.path.basename(previous)} is intact and still last_checkpoint" if previous
                    else "there is no earlier checkpoint")
            raise OSError(e.errno, f"could not write the checkpoint {save_file} ({e.strerror or e}; the disk of "
                                   f"{self.save_dir} has {usage.free / 2**30:.2f} of {usage.total / 2**30:.2f} GiB free). "
                                   f"Training stops here; {kept}: free space on that disk (or copy OUTPUT_DIR "
                                   f"to a disk that has it and set OUTPUT_DIR there), then --resume") from e

    def tag_last_checkpoint(self, last_filename_basename):
        path = os.path.join(self.save_dir, "last_checkpoint")
        _atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def _load_file(self, filename):
        self._file = filename
        if not filename.endswith(".pkl"):
            check_checkpoint_file(PathManager.get_local_path(filename))
        try:
            return super()._load_file(filename)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"{filename!r} holds Python objects besides tensors, which a safe (weights-only) torch.load refuses "
                f"({str(e).splitlines()[-1][:200]}): if you trust the file, load it yourself and torch.save its "
                f"{{'model': state_dict}} to a new file") from e

    def _load_model(self, checkpoint):
        found = checkpoint.get(VARIANT_KEY)
        if self.variant is not None and found is not None and found != self.variant:
            raise ValueError(
                f"the checkpoint was made for Mobile-Former {found}, but MODEL.MOBILEFORMER.VARIANT is "
                f"{self.variant}: set MODEL.MOBILEFORMER.VARIANT {found} or load a {self.variant} checkpoint"
            )
        if "ema" in checkpoint and self.use_average:
            self.logger.info(f"loading the averaged weights (MODEL_EMA, {checkpoint['ema']['updates']} updates) "
                             f"of {self._file}")
            checkpoint["model"] = checkpoint.pop("ema")["model"]
        backbone_only = _backbone_only(checkpoint["model"])
        if backbone_only:
            checkpoint["model"] = self._to_bottom_up(checkpoint["model"])
        if not checkpoint.get("matching_heuristics", False):
            self._check_fits(checkpoint["model"], backbone_only)
        return super()._load_model(checkpoint)

    def _to_bottom_up(self, state_dict):
        """A backbone-only checkpoint (``backbone.*``, ``head.*``) for a model whose Mobile-Former is
        the bottom-up network of an FPN (``backbone.bottom_up.*``, the builders of
        ``modeling/backbone/fpn.py``): its backbone keys moved there, as Detectron2's ImageNet ResNet
        weights load under an FPN."""
        if not any(k.startswith("backbone.bottom_up.") for k in self.model.state_dict()):
            return state_dict
        return {("backbone.bottom_up." + k[len("backbone."):] if k.startswith("backbone.") else k): v
                for k, v in state_dict.items()}

    def _check_fits(self, state_dict, backbone_only):
        """Raise ``ValueError`` when a checkpoint does not fit the model (see the class docstring): a
        detector's any difference, a backbone's only in shapes."""
        ours = self.model.state_dict()
        theirs = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
        mismatched = {k: (tuple(v.shape), tuple(ours[k].shape)) for k, v in theirs.items()
                      if k in ours and tuple(v.shape) != tuple(ours[k].shape)}
        if self.fine_tune:
            num_classes = getattr(self.model, "num_classes", None)
            classes_only = all(a[1:] == b[1:] and b[0] == num_classes for a, b in mismatched.values())
            if mismatched and classes_only:
                self.logger.warning(
                    f"fine-tuning to {num_classes} classes from a checkpoint with {next(iter(mismatched.values()))[0][0]}: "
                    f"the class heads ({', '.join(mismatched)}) start afresh")
                for k in mismatched:
                    state_dict.pop(k, None)
                    state_dict.pop("module." + k, None)
                mismatched = {}
        missing = [] if backbone_only else [k for k in ours if k not in theirs and not k.endswith("num_batches_tracked")]
        unexpected = [] if backbone_only else [k for k in theirs if k not in ours]
        if not (mismatched or missing or unexpected):
            return
        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} of other shapes (checkpoint vs config): " + ", ".join(
                f"{k} {a} vs {b}" for k, (a, b) in list(mismatched.items())[:6]))
        for label, keys in (("missing from the checkpoint", missing), ("in the checkpoint only", unexpected)):
            if keys:
                problems.append(f"{len(keys)} {label}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
        raise ValueError(
            f"the checkpoint {self._file!r} does not fit the model the config builds; {'; '.join(problems)}. Use the "
            f"config the checkpoint was trained with (its output folder's config.yaml), or set the keys it differs "
            f"in (e.g. MODEL.MF_DETR.NUM_CLASSES, DECODER.NUM_LAYERS, HIDDEN_DIM) to the checkpoint's values")


def _backbone_only(state_dict):
    """Whether ``state_dict`` is a backbone's (the converter's or a classifier's: ``backbone.*`` and
    ``head.*`` keys), not a detector's (RetinaNet's head is ``head.*`` too, but its Mobile-Former is
    an FPN's ``backbone.bottom_up``)."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in state_dict]
    return all(k.startswith(("backbone.", "head.")) for k in keys) and not any(
        k.startswith("backbone.bottom_up.") for k in keys)


def remove_stale_temporaries(folder):
    """Delete the temporary files that a save killed half-way left in ``folder`` (``*.tmp.<pid>``
    of :func:`_atomic_write`). Call it only while no other process writes there. Returns their names."""
    stale = sorted(glob.glob(os.path.join(glob.escape(folder), "*.tmp.[0-9]*")))
    for path in stale:
        os.remove(path)
    if stale:
        logger.info(f"removed {len(stale)} temporary file(s) left by an interrupted save: "
                    f"{', '.join(os.path.basename(p) for p in stale)}")
    return [os.path.basename(p) for p in stale]


def _atomic_write(path, write):
    """Call ``write(binary file)`` on a temporary file beside ``path``, then rename it over ``path``."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
