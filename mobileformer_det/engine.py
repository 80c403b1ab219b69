"""The Detectron2 trainer of MF-DETR: ``DefaultTrainer`` with the parts that differ built in
overridable places, once."""
import fcntl
import json
import logging
import os
import socket
import sys
import time
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

from .checkpoint import MobileFormerCheckpointer, remove_stale_temporaries
from .data import (
    DetrDatasetMapper,
    check_num_classes,
    check_training_boxes,
    drop_invalid_boxes,
    drop_missing_images,
)
from .ema import EMAHook, ModelEMA

__all__ = ["Trainer", "build_optimizer", "ClippingTrainer", "ClippingAMPTrainer", "ReplicaCheck", "DataProgress", "ReadableCOCOEvaluator",
           "claim_output_dir", "truncate_metrics"]

logger = logging.getLogger(__name__)

# Detectron2's channels-first LayerNorm (the neck's) is not an nn.LayerNorm.
_NO_DECAY_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, ChannelsFirstLayerNorm, nn.Embedding)
_NO_DECAY_NAMES = ("bias", "in_proj_bias", "tokens", "level_embed")


def build_optimizer(cfg, model):
    """AdamW (or SGD) with ``SOLVER.BACKBONE_MULTIPLIER`` on the parameters of ``model.backbone``
    (Detectron2's meta architectures' attribute; a peer's property) and no weight decay on norms,
    biases, embeddings, global tokens and level embeddings.

    Parameters are grouped by (lr, weight decay) (Detectron2's ``reduce_param_groups``): a handful
    of groups, so that PyTorch's multi-tensor (foreach) or fused implementation does one pass per
    group instead of one per parameter. Gradient clipping is the step trainer's (see
    :class:`ClippingTrainer`), so that under AMP it sees unscaled gradients.
    """
    params, seen = [], set()
    backbone = set(model.backbone.parameters()) if isinstance(getattr(model, "backbone", None), nn.Module) else set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            lr = cfg.SOLVER.BASE_LR
            if param in backbone:
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
    """Clip the norm of all the optimizer's gradients together to ``max_norm`` (``inf``: measure
    only). Returns their norm before clipping (a 0-dim tensor)."""
    return torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)


class _StopsOnNonFinite:
    """Stops training with ``FloatingPointError`` at the first step whose loss (or, without AMP,
    whose gradients) is not finite, before the optimizer applies it.

    The decision is the same on every process (one all-reduce of a flag per step), so that all of
    them stop at the same step instead of some waiting forever in the next collective. Under AMP,
    infinite gradients are the grad scaler's business (it skips the step and lowers its scale).
    The loss terms are read from the model's output by a forward hook.
    """

    def _watch_losses(self):
        self._losses = {}
        self.model.register_forward_hook(lambda module, inputs, output: setattr(
            self, "_losses", output if isinstance(output, dict) else {"total_loss": output}))  # as run_step reads it

    def _check_finite(self, grad_norm, amp):
        total = sum((v.detach().float().sum() for v in self._losses.values()), torch.zeros(()))
        bad = ~torch.isfinite(total)
        if not amp and grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm)
        flag = bad.float().reshape(1)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() == 0:
            return
        terms = sorted(self._losses.items(), key=lambda kv: bool(torch.isfinite(kv[1]).all()))
        shown = ", ".join(f"{k} {v.item():.4g}" for k, v in terms[:8]) + (" ..." if len(terms) > 8 else "")
        finite_grads = grad_norm is None or bool(torch.isfinite(grad_norm))
        where = "a non-finite loss" if not bool(torch.isfinite(total)) else (
            "non-finite gradients" if not finite_grads else "a non-finite loss on another process")
        norm = "not measured" if grad_norm is None else f"{float(grad_norm):.4g}"
        raise FloatingPointError(
            f"training diverged at iteration {self.iter}: {where} (gradient norm {norm}; loss terms on "
            f"this process: {shown}). This step was not applied, and no checkpoint is written from it. Lower "
            f"SOLVER.BASE_LR, keep SOLVER.CLIP_GRADIENTS.ENABLED on{', turn SOLVER.AMP.ENABLED off' if amp else ''}, "
            f"and train again, or --resume from a checkpoint written before the losses grew (see metrics.json)")


class ClippingTrainer(_StopsOnNonFinite, SimpleTrainer):
    """``SimpleTrainer`` that clips the norm of all gradients together to ``clip_norm`` after backward,
    and stops on a non-finite loss or gradient (:class:`_StopsOnNonFinite`)."""

    def __init__(self, model, data_loader, optimizer, clip_norm=None, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.clip_norm = clip_norm
        self._watch_losses()

    def after_backward(self):
        grad_norm = clip_full_model(self.optimizer, float("inf") if self.clip_norm is None else self.clip_norm)
        self._check_finite(grad_norm, amp=False)
        super().after_backward()


class ClippingAMPTrainer(_StopsOnNonFinite, AMPTrainer):
    """``AMPTrainer`` that clips the *unscaled* gradients, stops on a non-finite loss, and resumes
    from a checkpoint written without AMP (a CPU run has no grad-scaler state: the scaler then
    starts afresh)."""

    def __init__(self, model, data_loader, optimizer, clip_norm=None, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.clip_norm = clip_norm
        self._watch_losses()

    def after_backward(self):
        grad_norm = None
        if self.clip_norm is not None:
            # GradScaler.step then knows the gradients are unscaled (fused optimizers included).
            self.grad_scaler.unscale_(self.optimizer)
            grad_norm = clip_full_model(self.optimizer, self.clip_norm)
        self._check_finite(grad_norm, amp=True)
        super().after_backward()

    def load_state_dict(self, state_dict):
        if "grad_scaler" in state_dict:
            return super().load_state_dict(state_dict)
        SimpleTrainer.load_state_dict(self, state_dict)
        logger.info("the checkpoint has no grad-scaler state (saved without AMP): the scaler starts afresh")


# The config keys behind an optimizer group's hyper-parameters, for the resume log.
_SOLVER_KEYS = {"initial_lr": "learning rate (SOLVER.BASE_LR x BACKBONE_MULTIPLIER)", "weight_decay": "SOLVER.WEIGHT_DECAY",
                "betas": "SOLVER.BETAS", "momentum": "SOLVER.MOMENTUM"}


class ReadableCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` over the images that were read.

    An image the mapper could not read (it marks the input ``unreadable``, see
    :class:`~mobileformer_det.data.DetrDatasetMapper`), and one left out for a missing file, gets no
    prediction; COCOeval is then restricted to the images that have one, instead of counting every
    object of an unread image as missed. A warning says how many were left out. With every image
    read, this is ``COCOEvaluator`` exactly.
    """

    def process(self, inputs, outputs):
        read = [(i, o) for i, o in zip(inputs, outputs) if not i.get("unreadable")]
        if read:
            super().process(*map(list, zip(*read)))

    def _eval_predictions(self, predictions, img_ids=None):
        if img_ids is None and hasattr(self, "_coco_api"):
            evaluated = sorted({p["image_id"] for p in predictions})
            total = len(self._coco_api.getImgIds())
            if len(evaluated) < total:
                self._logger.warning(f"evaluating {len(evaluated)} of the {total} images of the dataset: the "
                                     f"others could not be read (see the warnings above)")
                img_ids = evaluated
        return super()._eval_predictions(predictions, img_ids=img_ids)


def claim_output_dir(path):
    """Make sure that no other training writes into ``path`` while this one runs.

    Takes an exclusive lock (``flock``, released by the kernel when the process ends, however it
    ends) on ``<path>/.train.lock`` and writes into it who holds it; another process that already
    holds it makes this raise ``RuntimeError`` naming that process. Then deletes the temporary
    files an interrupted checkpoint save left there. Returns the open lock file: keep it open.
    """
    os.makedirs(path, exist_ok=True)
    lock = open(os.path.join(path, ".train.lock"), "a+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise RuntimeError(
            f"OUTPUT_DIR {path!r} is in use by another training ({holder}): wait for it to end, stop it, or "
            f"set OUTPUT_DIR to another folder") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
               f"{' '.join(sys.argv)}\n")
    lock.flush()
    remove_stale_temporaries(path)
    return lock


def truncate_metrics(path, start_iter):
    """Drop the rows of Detectron2's ``metrics.json`` at ``path`` whose iteration is ``start_iter`` or
    later, in place (its ``JSONWriter`` may hold it open for appending). Returns how many went."""
    if not os.path.exists(path):
        return 0
    with open(path, "r+") as f:
        lines = f.readlines()
        kept = [line for line in lines if _iteration(line) < start_iter]
        if len(kept) < len(lines):
            f.seek(0)
            f.writelines(kept)
            f.truncate()
    if len(kept) < len(lines):
        logger.info(f"metrics.json: {len(lines) - len(kept)} row(s) from iteration {start_iter} on removed "
                    f"(written after the checkpoint by the run that stopped)")
    return len(lines) - len(kept)


def _iteration(line):
    try:
        return json.loads(line).get("iteration", -1)
    except ValueError:  # a line cut short by a kill
        return float("inf")


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


class DataProgress(hooks.HookBase):
    """Writes the iteration about to run into ``progress``, the shared tensor that the training
    mapper's schedules (``INPUT.MOSAIC.UNTIL_ITER``, ``INPUT.DFINE_AUG.UNTIL_ITER``) read in every
    data loader worker. Workers map a few batches ahead (prefetching), so a schedule's switch
    reaches the model a few steps late."""

    def __init__(self, progress):
        self._progress = progress

    def before_step(self):  # the first one runs before the loader's workers start: a resume's iteration reaches them
        self._progress.fill_(self.trainer.iter)


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
        self.model_ema = (ModelEMA(unwrap(model), cfg.MODEL_EMA.DECAY, cfg.MODEL_EMA.WARMUP_ITERS)
                          if cfg.MODEL_EMA.ENABLED else None)
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
        extra = {"ema": self.model_ema} if self.model_ema is not None else {}
        return MobileFormerCheckpointer(model, cfg.OUTPUT_DIR, variant=cfg.MODEL.MOBILEFORMER.VARIANT,
                                        trainer=weakref.proxy(self), **extra)

    def resume_or_load(self, resume=True):
        """Detectron2's resume (weights, optimizer moments, iteration, scheduler position from the last
        checkpoint) or load of ``MODEL.WEIGHTS``, with three differences:

        - a checkpoint that does not fit the model stops here (a new training from ``MODEL.WEIGHTS``
          may differ in the class count only: fine-tuning);
        - on resume, the config's solver settings win over the checkpoint's (Detectron2 would keep
          the learning rate and weight decay the optimizer was saved with while ``config.yaml``
          records the new ones): each change is logged;
        - on resume, ``metrics.json`` loses its rows from the resumed iteration on (they were
          written after the checkpoint by the run that stopped), so that every iteration appears once.
        """
        resuming = resume and self.checkpointer.has_checkpoint()
        if not resuming and not self.cfg.MODEL.WEIGHTS and self.cfg.MODEL.MOBILEFORMER.NORM == "FrozenBN":
            raise ValueError(
                "MODEL.MOBILEFORMER.NORM is FrozenBN, which keeps the batch-norm statistics of the weights it "
                "starts from, but MODEL.WEIGHTS is empty: convert the authors' ImageNet weights with "
                "tools/convert_official_weights.py and pass MODEL.WEIGHTS, or train from scratch with "
                "MODEL.MOBILEFORMER.NORM SyncBN (GPUs) or BN")
        configured = [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in self.optimizer.param_groups]
        self.checkpointer.fine_tune = self.checkpointer.use_average = not resuming
        super().resume_or_load(resume)
        if self.model_ema is not None and not self.model_ema.restored:
            self.model_ema.reset(unwrap(self.model))  # from the loaded weights (or a resumed run without EMA)
        if resuming:
            self._apply_configured_solver(configured)
            if comm.is_main_process():
                truncate_metrics(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"), self.start_iter)

    def train(self):
        """Detectron2's training loop; when it stops on divergence (``FloatingPointError``), a
        checkpoint written by the step just before (its weights gave the non-finite loss) is
        renamed ``*.diverged`` and ``last_checkpoint`` goes back to the newest checkpoint before it,
        so that ``--resume`` starts from weights that trained."""
        try:
            return super().train()
        except FloatingPointError:
            if comm.is_main_process():
                self._untag_diverged_checkpoint()
            raise

    def _untag_diverged_checkpoint(self):
        latest = self.checkpointer.get_checkpoint_file()
        if not latest or os.path.basename(latest) != f"model_{self.iter - 1:07d}.pth":
            return
        os.replace(latest, latest + ".diverged")
        others = [f for f in self.checkpointer.get_all_checkpoint_files() if os.path.basename(f).startswith("model_")]
        if others:
            previous = max(others, key=lambda f: (os.path.getmtime(f), f))
            self.checkpointer.tag_last_checkpoint(os.path.basename(previous))
        else:
            os.remove(os.path.join(self.cfg.OUTPUT_DIR, "last_checkpoint"))
            previous = "none (--resume would start from MODEL.WEIGHTS)"
        logger.error(f"{os.path.basename(latest)} holds the weights that diverged: renamed to "
                     f"{os.path.basename(latest)}.diverged; last_checkpoint is now {os.path.basename(previous)}")

    def _apply_configured_solver(self, configured):
        """Put the config's hyper-parameters (``configured``: each group's, before the checkpoint was
        loaded) back into the resumed optimizer and scheduler; log what changes."""
        changes = set()
        for group, wanted in zip(self.optimizer.param_groups, configured):
            for key, value in wanted.items():
                if group.get(key) != value:
                    changes.add(f"{_SOLVER_KEYS.get(key, key)} {group.get(key)} -> {value}")
                    group[key] = value
        if changes:
            self.scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
                group["lr"] = lr
            logger.warning(f"resuming with the config's solver settings, not the checkpoint's: {'; '.join(sorted(changes))}")

    def _test_averaged_weights(self):
        with self.model_ema.applied(unwrap(self.model)):
            self._last_eval_results = self.test(self.cfg, self.model)
        return self._last_eval_results

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        """The training images, checked before any is read: files that are not there are left out
        (all missing: an error), invalid boxes dropped with a count per reason, then the checks of
        :func:`check_training_boxes` and :func:`check_num_classes`."""
        dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        dicts = drop_missing_images(dicts, cfg.DATASETS.TRAIN)
        dicts, dropped = drop_invalid_boxes(dicts, cfg.DATASETS.TRAIN)
        check_training_boxes(dicts, cfg.DATASETS.TRAIN, dropped)
        for name in cfg.DATASETS.TRAIN:
            check_num_classes(cfg.MODEL.MF_DETR.NUM_CLASSES, name)
        mapper = DetrDatasetMapper(cfg, is_train=True, dataset_dicts=dicts)
        loader = build_detection_train_loader(cfg, mapper=mapper, dataset=dicts)
        loader.progress = mapper.progress  # the iteration the mapper's schedule reads (DataProgress writes it)
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader over the images of ``dataset_name`` that exist (the others are
        named in a warning); an image that cannot be read is skipped by the mapper and the
        evaluator (:class:`ReadableCOCOEvaluator`)."""
        check_num_classes(cfg.MODEL.MF_DETR.NUM_CLASSES, dataset_name)
        dicts = drop_missing_images(get_detection_dataset_dicts([dataset_name], filter_empty=False), [dataset_name])
        return build_detection_test_loader(dataset=dicts, mapper=DetrDatasetMapper(cfg, is_train=False),
                                           num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return ReadableCOCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Detectron2's evaluation; every process first takes process 0's buffers, so that all
        evaluate the model that the checkpoint holds."""
        broadcast_buffers(model)
        return super().test(cfg, model, evaluators)

    def build_hooks(self):
        # DefaultTrainer's hooks, with the periodic checkpointer keeping only the last few files; with
        # MODEL_EMA, the average is updated before them and evaluated instead of the weights.
        hook_list = super().build_hooks()
        for i, h in enumerate(hook_list):
            if isinstance(h, hooks.PeriodicCheckpointer):
                hook_list[i] = hooks.PeriodicCheckpointer(
                    self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD, max_to_keep=3)
            elif isinstance(h, hooks.EvalHook) and self.model_ema is not None:
                hook_list[i] = hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self._test_averaged_weights)
        if self.model_ema is not None:
            hook_list.insert(2, EMAHook(self.model_ema, unwrap(self.model)))  # after the timer and scheduler
        progress = getattr(self._trainer.data_loader, "progress", None)
        if progress is not None:
            hook_list.insert(0, DataProgress(progress))
        if comm.get_world_size() > 1:  # last on every process: collectives run in the same order
            hook_list.append(ReplicaCheck(self.model, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        return hook_list
