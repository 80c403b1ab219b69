"""What a cluster's preemption does to a training: SLURM and Kubernetes send ``SIGTERM`` before they
kill a job, and SLURM's ``--signal`` sends ``SIGUSR1`` as a warning. On either, every process
finishes its step, the main process writes a checkpoint, and all exit with
:data:`EXIT_PREEMPTED`; ``train_net.py --resume`` continues from that checkpoint."""
import logging
import os
import signal

import torch
from detectron2.engine import hooks
from detectron2.utils import comm

__all__ = ["EXIT_PREEMPTED", "PREEMPTION_SIGNALS", "Preempted", "Preemption", "PreemptionSignals", "forward_signals"]

logger = logging.getLogger("mobileformer_det.engine")

# The exit status of a preempted training: EX_TEMPFAIL of sysexits.h, "try again later".
EXIT_PREEMPTED = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Training stopped on a preemption signal, its checkpoint written (``checkpoint``: its file)."""

    def __init__(self, message, checkpoint):
        super().__init__(message)
        self.checkpoint = checkpoint


class PreemptionSignals:
    """Records the preemption signals this process receives (:data:`PREEMPTION_SIGNALS`) instead of
    dying of them: ``received`` holds the first one's name. ``install()`` in the main thread;
    ``restore()`` puts the former handlers back."""

    def __init__(self):
        self.received = None
        self._former = {}

    def install(self):
        for signum in PREEMPTION_SIGNALS:
            self._former[signum] = signal.signal(signum, self._record)
        return self

    def restore(self):
        for signum, handler in self._former.items():
            signal.signal(signum, handler)
        self._former.clear()

    def _record(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
            logger.warning(f"{self.received} received: training stops after this step, with a checkpoint")


def forward_signals(children):
    """Make this (launching) process pass the preemption signals on to the processes ``children()``
    returns, instead of dying of them: a cluster may signal only the job's first process."""
    def forward(signum, frame):
        for child in children():
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, forward)


class _QuietPreemption(logging.Filter):
    """Detectron2's training loop logs every exception that ends it with a traceback; a preemption is not an error."""

    def filter(self, record):
        return not (record.exc_info and isinstance(record.exc_info[1], Preempted))


class Preemption(hooks.HookBase):
    """During training, records the preemption signals (``signals``: :class:`PreemptionSignals`);
    after every step, the processes agree (one all-reduce of a flag) on whether one of them has
    received one; if so, the main process writes a checkpoint of this step (``model_<iteration>.pth``, atomically, and
    ``last_checkpoint``), as the periodic checkpointer would, and every process raises
    :class:`Preempted`. Put it after the hooks that change what a checkpoint holds (the learning
    rate scheduler, the weight average, the periodic checkpointer)."""

    def __init__(self, checkpointer):
        self.signals, self._checkpointer = PreemptionSignals(), checkpointer
        self._quiet = _QuietPreemption()

    def before_train(self):  # a signal before this (the model and data being set up) ends the process
        self.signals.install()
        logging.getLogger("detectron2.engine.train_loop").addFilter(self._quiet)

    def after_train(self):
        self.signals.restore()
        logging.getLogger("detectron2.engine.train_loop").removeFilter(self._quiet)

    def after_step(self):
        device = next(self.trainer.model.parameters()).device  # NCCL reduces CUDA tensors only
        flag = torch.tensor([float(self.signals.received is not None)], device=device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() == 0:
            return
        iteration = self.trainer.iter
        name = f"model_{iteration:07d}"
        self._checkpointer.save(name, iteration=iteration)
        comm.synchronize()
        raise Preempted(f"training stopped at iteration {iteration} by {self.signals.received or 'another process'}"
                        f"'s preemption signal; {name}.pth is written and is last_checkpoint: --resume continues "
                        f"from iteration {iteration + 1}", f"{name}.pth")
