"""The Detectron2 trainer of MF-DETR: only what differs from ``DefaultTrainer``."""
import itertools
import os
import weakref

import detectron2.engine.defaults as d2_defaults
import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.layers.batch_norm import LayerNorm as ChannelsFirstLayerNorm
from detectron2.utils import comm
from torch import nn

from .checkpoint import MobileFormerCheckpointer
from .data import DetrDatasetMapper

__all__ = ["Trainer", "build_optimizer"]

# Detectron2's channels-first LayerNorm (the neck's) is not an nn.LayerNorm.
_NO_DECAY_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, ChannelsFirstLayerNorm, nn.Embedding)
_NO_DECAY_NAMES = ("tokens", "level_embed")


def _create_ddp_model(model, **kwargs):
    # Detectron2 passes device_ids=[local_rank], which DistributedDataParallel refuses for a CPU model.
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _d2_create_ddp_model(model, **kwargs)


_d2_create_ddp_model = d2_defaults.create_ddp_model
d2_defaults.create_ddp_model = _create_ddp_model


def build_optimizer(cfg, model):
    """AdamW (or SGD) with ``SOLVER.BACKBONE_MULTIPLIER`` on backbone parameters, no weight decay on
    norms, biases, embeddings, global tokens and level embeddings, and full-model gradient-norm
    clipping when ``SOLVER.CLIP_GRADIENTS`` is enabled (Detectron2's own clipping is per parameter)."""
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            lr = cfg.SOLVER.BASE_LR
            if module_name.startswith("backbone.") or module_name == "backbone":
                lr *= cfg.SOLVER.BACKBONE_MULTIPLIER
            no_decay = isinstance(module, _NO_DECAY_MODULES) or name == "bias" or name in _NO_DECAY_NAMES
            groups.append({"params": [param], "lr": lr, "weight_decay": 0.0 if no_decay else cfg.SOLVER.WEIGHT_DECAY})

    if cfg.SOLVER.OPTIMIZER.upper() == "ADAMW":
        base, kwargs = torch.optim.AdamW, {"betas": tuple(cfg.SOLVER.BETAS)}
    elif cfg.SOLVER.OPTIMIZER.upper() == "SGD":
        base, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")

    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        max_norm = clip.CLIP_VALUE

        class FullModelClippingOptimizer(base):
            def step(self, closure=None):
                params = itertools.chain(*[g["params"] for g in self.param_groups])
                torch.nn.utils.clip_grad_norm_(params, max_norm)
                return super().step(closure=closure)

        base = FullModelClippingOptimizer
    return base(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with the DETR mapper, AdamW + backbone multiplier + full-model clipping,
    COCOEvaluator and a checkpointer that writes atomically and checks the backbone variant."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.checkpointer = MobileFormerCheckpointer(
            self._trainer.model, cfg.OUTPUT_DIR, variant=cfg.MODEL.MOBILEFORMER.VARIANT, trainer=weakref.proxy(self),
        )
        # The hooks captured DefaultTrainer's checkpointer: build them again around ours.
        self._hooks = []
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=DetrDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    def build_hooks(self):
        # DefaultTrainer's hooks, with the periodic checkpointer keeping only the last few files.
        hook_list = super().build_hooks()
        for i, h in enumerate(hook_list):
            if isinstance(h, hooks.PeriodicCheckpointer):
                hook_list[i] = hooks.PeriodicCheckpointer(
                    self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=3)
        return hook_list
