"""Training and evaluation with Detectron2's trainer, one concern a module:

- ``trainer``: :class:`Trainer` (``DefaultTrainer`` with this project's parts);
- ``optimizer``: AdamW with the backbone multiplier, full-model gradient clipping;
- ``steps``: the training step, stopping on divergence before it is applied;
- ``evaluation``: the COCO evaluator over the images that were read;
- ``output_dir``: who owns ``OUTPUT_DIR``, and one history after a resume;
- ``distributed``: what several processes must agree on;
- ``preemption``: a checkpoint and a documented exit on a cluster's preemption signal;
- ``hooks``: what tells the data loader where training is.
"""
from .distributed import ReplicaCheck
from .evaluation import ReadableCOCOEvaluator
from .hooks import DataProgress
from .optimizer import build_optimizer, clip_full_model, clip_norm_from_config
from .output_dir import claim_output_dir, truncate_metrics
from .preemption import EXIT_PREEMPTED, Preempted, forward_signals
from .steps import ClippingAMPTrainer, ClippingTrainer
from .trainer import Trainer

__all__ = ["Trainer", "build_optimizer", "clip_full_model", "clip_norm_from_config", "ClippingTrainer",
           "ClippingAMPTrainer", "ReplicaCheck", "DataProgress", "ReadableCOCOEvaluator", "claim_output_dir",
           "truncate_metrics", "EXIT_PREEMPTED", "Preempted", "forward_signals"]
