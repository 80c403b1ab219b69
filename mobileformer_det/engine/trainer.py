"""The Detectron2 trainer of MF-DETR: ``DefaultTrainer`` with the parts that differ built in
overridable places, once."""
import logging
import os
import weakref

from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer, create_ddp_model, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.utils import comm
from detectron2.utils.events import TensorboardXWriter
from detectron2.utils.logger import setup_logger

from ..checkpoint import MobileFormerCheckpointer
from ..config import num_classes
from ..data import (
    DetrDatasetMapper,
    check_num_classes,
    check_training_boxes,
    drop_invalid_boxes,
    drop_missing_images,
)
from ..ema import EMAHook, ModelEMA
from .distributed import CheckpointEveryPeriod, ReplicaCheck, broadcast_buffers, has_trainable_batch_norm, unwrap
from .evaluation import ReadableCOCOEvaluator
from .hooks import DataProgress
from .optimizer import build_optimizer, clip_norm_from_config
from .output_dir import ResumingTensorboardWriter, truncate_metrics
from .preemption import Preemption
from .steps import ClippingAMPTrainer, ClippingTrainer

__all__ = ["Trainer"]

logger = logging.getLogger("mobileformer_det.engine")


# The config keys behind an optimizer group's hyper-parameters, for the resume log.
_SOLVER_KEYS = {"initial_lr": "learning rate (SOLVER.BASE_LR x BACKBONE_MULTIPLIER)", "weight_decay": "SOLVER.WEIGHT_DECAY",
                "betas": "SOLVER.BETAS", "momentum": "SOLVER.MOMENTUM"}


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
        self._trainer = step_trainer(model, data_loader, optimizer, clip_norm=clip_norm_from_config(cfg),
                                     divergence_factor=cfg.SOLVER.DIVERGENCE.FACTOR,
                                     divergence_window=cfg.SOLVER.DIVERGENCE.WINDOW)
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
        count, key = num_classes(cfg)
        for name in cfg.DATASETS.TRAIN:
            check_num_classes(count, name, key)
        mapper = DetrDatasetMapper(cfg, is_train=True, dataset_dicts=dicts)
        loader = build_detection_train_loader(cfg, mapper=mapper, dataset=dicts)
        loader.progress = mapper.progress  # the iteration the mapper's schedule reads (DataProgress writes it)
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader over the images of ``dataset_name`` that exist (the others are
        named in a warning); an image that cannot be read is skipped by the mapper and the
        evaluator (:class:`ReadableCOCOEvaluator`)."""
        count, key = num_classes(cfg)
        check_num_classes(count, dataset_name, key)
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

    def build_writers(self):
        """Detectron2's writers, with :class:`ResumingTensorboardWriter` for its TensorBoard one."""
        return [ResumingTensorboardWriter(self, self.cfg.OUTPUT_DIR) if isinstance(w, TensorboardXWriter) else w
                for w in super().build_writers()]

    def build_hooks(self):
        # DefaultTrainer's hooks, with the periodic checkpointer on every process (it saves on the
        # main one; see CheckpointEveryPeriod) keeping only the last few files; with MODEL_EMA, the
        # average is updated before them and evaluated instead of the weights.
        hook_list = [h for h in super().build_hooks() if not isinstance(h, hooks.PeriodicCheckpointer)]
        evaluation = next(i for i, h in enumerate(hook_list) if isinstance(h, hooks.EvalHook))
        hook_list.insert(evaluation, CheckpointEveryPeriod(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD,
                                                           max_to_keep=3))
        if self.model_ema is not None:
            hook_list[evaluation + 1] = hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self._test_averaged_weights)
            hook_list.insert(2, EMAHook(self.model_ema, unwrap(self.model)))  # after the timer and scheduler
        progress = getattr(self._trainer.data_loader, "progress", None)
        if progress is not None:
            hook_list.insert(0, DataProgress(progress))
        if comm.get_world_size() > 1:  # last on every process: collectives run in the same order
            hook_list.append(ReplicaCheck(self.model, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        hook_list.append(Preemption(self.checkpointer))  # after everything a checkpoint holds has stepped
        return hook_list
