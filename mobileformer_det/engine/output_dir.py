"""What a training writes into ``OUTPUT_DIR``: who owns it, and one history after a resume."""
import fcntl
import json
import logging
import os
import socket
import sys
import time
import weakref
from functools import cached_property

from detectron2.utils.events import TensorboardXWriter

from ..checkpoint import remove_stale_temporaries

__all__ = ["ResumingTensorboardWriter", "claim_output_dir", "truncate_metrics"]

logger = logging.getLogger("mobileformer_det.engine")


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


class ResumingTensorboardWriter(TensorboardXWriter):
    """Detectron2's ``TensorboardXWriter``, which on a resumed run hides the event files' points at
    and after the resumed iteration (``SummaryWriter(purge_step=...)``: they were written after the
    checkpoint by the run that stopped), so that TensorBoard shows one curve, as ``metrics.json``
    keeps one history (:func:`truncate_metrics`). Its writer opens at the first write, once
    ``trainer.start_iter`` is known."""

    def __init__(self, trainer, log_dir, window_size=20):
        super().__init__(log_dir, window_size)
        self._trainer = weakref.proxy(trainer)

    @cached_property
    def _writer(self):
        from torch.utils.tensorboard import SummaryWriter

        start = self._trainer.start_iter
        return SummaryWriter(self._writer_args["log_dir"], purge_step=start if start > 0 else None)
