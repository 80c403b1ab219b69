"""The Detectron2 trainer of MF-DETR: ``DefaultTrainer`` with the parts that differ built in
overridable places, once."""
import logging
import os
import weakref

import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, create_ddp_model, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.layers.batch_norm import LayerNorm as ChannelsFirstLayerNorm
from detectron2.solver.build import reduce_param_groups
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import MobileFormerCheckpointer
from .data import DetrDatasetMapper, check_num_classes, check_training_boxes

__all__ = ["Trainer", "build_optimizer", "ClippingTrainer", "ClippingAMPTrainer", "ReplicaCheck"]

logger = logging.getLogger(__name__)

# Detectron2's channels-first LayerNorm (the neck's) is not an nn.LayerNorm.
_NO_DECAY_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, ChannelsFirstLayerNorm, nn.Embedding)
_NO_DECAY_NAMES = ("bias", "in_proj_bias", "tokens", "level_embed")


def build_optimizer(cfg, model):
    """AdamW (or SGD) with ``SOLVER.BACKBONE_MULTIPLIER`` on backbone parameters and no weight decay
    on norms, biases, embeddings, global tokens and level embeddings.

    Parameters are grouped by (lr, weight decay) (Detectron2's ``reduce_param_groups``): a handful
    of groups, so that PyTorch's multi-tensor (foreach) or fused implementation does one pass per
    group instead of one per parameter. Gradient clipping is the step trainer's (see
    :class:`ClippingTrainer`), so that under AMP it sees unscaled gradients.
    """
    params, seen = [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            lr = cfg.SOLVER.BASE_LR
            if module_name == "backbone" or module_name.startswith("backbone."):
                lr *= cfg.SOLVER.BACKBONE_MULTIPLIER
            no_decay = isinstance(module, _NO_DECAY_MODULES) or name in _NO_DECAY_NAMES
            params.append({"params": [param], "lr": lr, "weight_decay": 0.0 if no_decay else cfg.SOLVER.WEIGHT_DECAY})
    groups = reduce_param_groups(params)

    # fused: one kernel for all parameters (CUDA; the CPU too since PyTorch 2.4); else foreach.
    device = next(model.parameters()).device.type
    fused = {"fused": True} if device == "cuda" or (device == "cpu" and _cpu_fused_adamw()) else {"foreach": True}
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        return torch.optim.AdamW(groups, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS), **fused)
    if name == "SGD":
        return torch.optim.SGD(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, **fused)
    raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")


def _cpu_fused_adamw():
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
        return True
    except (RuntimeError, ValueError):
        return False


def clip_norm_from_config(cfg):
    """The full-model gradient-norm limit, or None when clipping is off."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return None
    if clip.CLIP_TYPE != "full_model":
        raise ValueError(f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be 'full_model' (the norm of all gradients "
                         f"together, as DETR clips), got {clip.CLIP_TYPE!r}")
    return clip.CLIP_VALUE


def clip_full_model(optimizer, max_norm):
    """Clip the norm of all the optimizer's gradients together to ``max_norm``."""
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)


class ClippingTrainer(SimpleTrainer):
    """``SimpleTrainer`` that clips the norm of all gradients together to ``clip_norm`` after backward."""

    def __init__(self, model, data_loader, optimizer, clip_norm=None, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.clip_norm = clip_norm

    def after_backward(self):
        if self.clip_norm is not None:
            clip_full_model(self.optimizer, self.clip_norm)
        super().after_backward()


class ClippingAMPTrainer(AMPTrainer):
    """``AMPTrainer`` that clips the *unscaled* gradients, and resumes from a checkpoint written
    without AMP (a CPU run has no grad-scaler state: the scaler then starts afresh)."""

    def __init__(self, model, data_loader, optimizer, clip_norm=None, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.clip_norm = clip_norm

    def after_backward(self):
        if self.clip_norm is not None:
            # GradScaler.step then knows the gradients are unscaled (fused optimizers included).
            self.grad_scaler.unscale_(self.optimizer)
            clip_full_model(self.optimizer, self.clip_norm)
        super().after_backward()

    def load_state_dict(self, state_dict):
        if "grad_scaler" in state_dict:
            return super().load_state_dict(state_dict)
        SimpleTrainer.load_state_dict(self, state_dict)
        logger.info("the checkpoint has no grad-scaler state (saved without AMP): the scaler starts afresh")


def has_trainable_batch_norm(model):
    """Whether some BatchNorm updates running statistics of its own process's batches."""
    return any(type(m) is nn.BatchNorm2d and m.track_running_stats for m in model.modules())


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def broadcast_buffers(model):
    """Give every process the buffers (BatchNorm statistics) of process 0, the ones its checkpoint holds."""
    if comm.get_world_size() > 1:
        for buffer in unwrap(model).buffers():
            torch.distributed.broadcast(buffer, 0)


class ReplicaCheck(hooks.HookBase):
    """With several processes: at each checkpoint period and at the end of training, checks that every
    process holds the same weights (DistributedDataParallel keeps them equal unless the processes
    ran different computations) and logs the result, with the processes that differ."""

    def __init__(self, model, period):
        self._model, self._period = model, period

    def check(self):
        sums = [float(p.detach().double().sum()) for p in unwrap(self._model).parameters()]
        gathered = comm.all_gather(sums)
        if comm.is_main_process():
            differ = [rank for rank, other in enumerate(gathered) if other != gathered[0]]
            if differ:
                logger.error(f"the weights of processes {differ} differ from those of process 0")
            else:
                logger.info(f"weights identical on all {len(gathered)} processes (checksum {sum(sums):.6f})")

    def after_step(self):
        it = self.trainer.iter + 1
        if self._period > 0 and it % self._period == 0 and it != self.trainer.max_iter:
            self.check()

    def after_train(self):
        self.check()


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with the DETR mapper, AdamW + backbone multiplier, full-model gradient
    clipping (AMP-safe), COCOEvaluator, and a checkpointer that writes atomically and checks the
    backbone variant.

    Unlike ``DefaultTrainer`` it reads the training set before building the model, so that data
    that cannot be trained on (no box, more categories than ``MODEL.MF_DETR.NUM_CLASSES``) stops
    the run at once; and it builds DistributedDataParallel (:meth:`build_ddp_model`) and the
    checkpointer (:meth:`build_checkpointer`) in methods a subclass can override.
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        data_loader = self.build_train_loader(cfg)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        model = self.build_ddp_model(cfg, model)
        step_trainer = ClippingAMPTrainer if cfg.SOLVER.AMP.ENABLED else ClippingTrainer
        self._trainer = step_trainer(model, data_loader, optimizer, clip_norm=clip_norm_from_config(cfg))
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.build_checkpointer(cfg, model)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_ddp_model(cls, cfg, model):
        """DistributedDataParallel when there are several processes (Detectron2's ``create_ddp_model``).

        A CPU model gets ``device_ids=None`` (PyTorch refuses device ids for it). With a trainable
        BatchNorm, process 0's buffers are broadcast at every forward, so that the running
        statistics do not drift apart between processes.
        """
        kwargs = {"broadcast_buffers": has_trainable_batch_norm(model)}
        if next(model.parameters()).device.type == "cpu":
            kwargs["device_ids"] = None
        return create_ddp_model(model, **kwargs)

    def build_checkpointer(self, cfg, model):
        return MobileFormerCheckpointer(model, cfg.OUTPUT_DIR, variant=cfg.MODEL.MOBILEFORMER.VARIANT,
                                        trainer=weakref.proxy(self))

    def resume_or_load(self, resume=True):
        resuming = resume and self.checkpointer.has_checkpoint()
        if not resuming and not self.cfg.MODEL.WEIGHTS and self.cfg.MODEL.MOBILEFORMER.NORM == "FrozenBN":
            raise ValueError(
                "MODEL.MOBILEFORMER.NORM is FrozenBN, which keeps the batch-norm statistics of the weights it "
                "starts from, but MODEL.WEIGHTS is empty: convert the authors' ImageNet weights with "
                "tools/convert_official_weights.py and pass MODEL.WEIGHTS, or train from scratch with "
                "MODEL.MOBILEFORMER.NORM SyncBN (GPUs) or BN")
        super().resume_or_load(resume)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        check_training_boxes(dicts, cfg.DATASETS.TRAIN)
        for name in cfg.DATASETS.TRAIN:
            check_num_classes(cfg.MODEL.MF_DETR.NUM_CLASSES, name)
        return build_detection_train_loader(cfg, mapper=DetrDatasetMapper(cfg, is_train=True), dataset=dicts)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        loader = build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, is_train=False))
        check_num_classes(cfg.MODEL.MF_DETR.NUM_CLASSES, dataset_name)
        return loader

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Detectron2's evaluation; every process first takes process 0's buffers, so that all
        evaluate the model that the checkpoint holds."""
        broadcast_buffers(model)
        return super().test(cfg, model, evaluators)

    def build_hooks(self):
        # DefaultTrainer's hooks, with the periodic checkpointer keeping only the last few files.
        hook_list = super().build_hooks()
        for i, h in enumerate(hook_list):
            if isinstance(h, hooks.PeriodicCheckpointer):
                hook_list[i] = hooks.PeriodicCheckpointer(
                    self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=3)
        if comm.get_world_size() > 1:  # last on every process: collectives run in the same order
            hook_list.append(ReplicaCheck(self.model, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        return hook_list
