"""What several training processes must agree on: batch-norm buffers and weights."""
import logging

import torch
from detectron2.engine import hooks
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["CheckpointEveryPeriod", "ReplicaCheck", "broadcast_buffers", "has_trainable_batch_norm", "unwrap"]

logger = logging.getLogger("mobileformer_det.engine")


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


class CheckpointEveryPeriod(hooks.PeriodicCheckpointer):
    """Detectron2's periodic checkpointer (every ``period`` iterations and at the end, keeping the
    last ``max_to_keep`` files), on every process: the main process writes, and all of them take
    part in the checkpointer's agreement on whether the write succeeded
    (:meth:`~mobileformer_det.checkpoint.MobileFormerCheckpointer.save`), so that a failed write (a
    full disk) stops every process at the same step. Detectron2 registers its own on the main
    process only."""

    def step(self, iteration, **kwargs):
        if comm.is_main_process():
            return super().step(iteration, **kwargs)
        if (iteration + 1) % self.period == 0:
            self.checkpointer.save(f"{self.file_prefix}_{iteration:07d}", iteration=iteration, **kwargs)
        if self.max_iter is not None and iteration >= self.max_iter - 1:
            self.checkpointer.save(f"{self.file_prefix}_final", iteration=iteration, **kwargs)
