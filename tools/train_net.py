#!/usr/bin/env python
"""Train or evaluate MF-DETR with Detectron2 (its standard flags: --config-file, --num-gpus,
--num-machines, --machine-rank, --dist-url, --resume, --eval-only, trailing KEY VALUE overrides).

Without CUDA, MODEL.DEVICE falls back to cpu and AMP is turned off. With MODEL.DEVICE cpu,
--num-gpus N starts N processes that talk over gloo, also on a machine that has GPUs.

A training holds a lock on its OUTPUT_DIR: a second one started into the same folder stops at once,
naming the first. --eval-only needs weights: MODEL.WEIGHTS, or --resume with a checkpoint in OUTPUT_DIR.

On SIGTERM or SIGUSR1 (a cluster's preemption), every process finishes its step, the main process
writes a checkpoint (last_checkpoint), and the job exits with status 75 (EXIT_PREEMPTED):
--resume continues from it.
"""
import logging
import multiprocessing
import os
import sys

import torch
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.multiprocessing import ProcessExitedException

from mobileformer_det import setup_cfg
from mobileformer_det.checkpoint import MobileFormerCheckpointer
from mobileformer_det.data import register_datasets_from_config
from mobileformer_det.engine import EXIT_PREEMPTED, Preempted, Trainer, claim_output_dir, forward_signals

logger = logging.getLogger("mobileformer_det")


def processes_on_cpu(cfg, world_size):
    """Make ``launch`` start gloo, not NCCL, processes for a CPU config on a machine with GPUs.

    Detectron2's ``launch`` picks NCCL whenever CUDA is available; NCCL cannot carry CPU tensors.
    Hiding the GPUs from the processes it starts (they read ``CUDA_VISIBLE_DEVICES`` when they
    start) makes it pick gloo. Returns the warning it logged, if any.
    """
    if not cfg.MODEL.DEVICE.startswith("cpu") or not torch.cuda.is_available():
        return None
    message = "MODEL.DEVICE is cpu although CUDA is available: training on the CPU (set MODEL.DEVICE cuda to use the GPUs)"
    if world_size > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        message += f"; the {world_size} processes use gloo"
    logger.warning(message)
    return message


def weights_problem(cfg, args):
    """Why ``--eval-only`` would evaluate a model that was never trained (None when it would not)."""
    has = os.path.exists(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not args.eval_only or cfg.MODEL.WEIGHTS or (args.resume and has):
        return None
    return ("--eval-only needs trained weights: pass MODEL.WEIGHTS path/to/model_final.pth"
            + (f", or add --resume to evaluate the last checkpoint in {cfg.OUTPUT_DIR!r}" if has else ""))


def main(cfg, args):
    default_setup(cfg, args)
    if cfg.MODEL.DEVICE.startswith("cpu") and comm.get_local_size() > 1:
        # Each process would take every core of the machine, and together they would thrash.
        torch.set_num_threads(max(1, torch.get_num_threads() // comm.get_local_size()))
    # Our package's logger beside Detectron2's: its file log, and the console on process 0 (unless
    # this process already configured it, before launch).
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="mobileformer_det", abbrev_name="mfdet",
                 configure_stdout=not logger.handlers)
    register_datasets_from_config(cfg)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        MobileFormerCheckpointer(model, save_dir=cfg.OUTPUT_DIR, variant=cfg.MODEL.MOBILEFORMER.VARIANT).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        verify_results(cfg, results)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        try:
            results = trainer.train()
        except Preempted as e:
            logger.warning(f"{e}; exit status {EXIT_PREEMPTED}")
            leave_together()
            sys.exit(EXIT_PREEMPTED)
    leave_together()
    return results


def leave_together():
    """Leave together and close the process groups: a process that exits while gloo still holds
    its peers' connections can abort ("terminate called without an active exception")."""
    if comm.get_world_size() > 1:
        comm.synchronize()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    setup_logger(name="mobileformer_det", abbrev_name="mfdet")
    cfg = setup_cfg(args.config_file, args.opts)  # once, here: the processes get it as it is
    problem = weights_problem(cfg, args)
    if problem:
        sys.exit(f"train_net.py: error: {problem}")
    if not args.eval_only and args.machine_rank == 0:  # before anything is written there
        try:
            lock = claim_output_dir(cfg.OUTPUT_DIR)  # noqa: F841 (held open until this process ends)
        except RuntimeError as e:
            sys.exit(f"train_net.py: error: {e}")
    processes_on_cpu(cfg, args.num_gpus * args.num_machines)
    if args.num_gpus > 1:
        forward_signals(multiprocessing.active_children)  # a cluster may signal this process only
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(cfg, args))
    except ProcessExitedException as e:
        if e.exit_code != EXIT_PREEMPTED:
            raise
        sys.exit(EXIT_PREEMPTED)
