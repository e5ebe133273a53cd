"""The training engine: everything that is not a method's maths. Read it in this order:

- :mod:`~cawbench.engine.trainer`: the training loop (:class:`Trainer`: build, train epochs, evaluate,
  record, checkpoint, result row) and :func:`train`;
- :mod:`~cawbench.engine.step`: one batch through every unit (:class:`BatchStep`) and the one object a batch
  carries (:class:`StepState`: schedule point, loss weights, active units, the epoch's statistics);
- :mod:`~cawbench.engine.updates`: the units' updates merged (``train.merge_units``: one clipping pass, one
  optimiser call per optimiser kind, the method's shared loss pieces); :mod:`~cawbench.engine.stats`: the
  epoch's running sums (:class:`StepStats`);
- :mod:`~cawbench.engine.executors`: in which order batches and units run, chosen by name from a registry
  (``sequential``, ``streams``, ``cuda_graph``; ``pipeline`` in :mod:`~cawbench.engine.pipeline`), each
  with the sequential updates;
- :mod:`~cawbench.engine.checkpoint`: saving and resuming; :mod:`~cawbench.engine.records`: epoch means,
  the result row, artifacts; :mod:`~cawbench.engine.devices`: device, precision, optimisers.

The engine never imports a method (``tests/test_import_rules.py``): it builds whatever ``cfg.method`` names
through :mod:`cawbench.method`.
"""

from cawbench.divergence import TrainingDiverged
from cawbench.engine.checkpoint import ResumeError, load_checkpoint, save_checkpoint
from cawbench.engine.devices import autocast, make_optimizer, resolve_device, use_bf16
from cawbench.engine.executors import (
    EXECUTORS,
    CudaGraphBackend,
    ExecutorSetup,
    GraphedSteps,
    ReplayBackend,
    StreamsStep,
    build_executor,
    executor_name,
    register_executor,
    with_replayed_graphs,
)
from cawbench.engine.pipeline import PipelineRunner, ThreadPipeline, balanced_groups, run_thread_pipeline
from cawbench.engine.records import default_run_name, run_dir_for, software_versions
from cawbench.engine.stats import StepStats
from cawbench.engine.step import BatchStep, StepState, UnitState, weighted_sum
from cawbench.engine.trainer import EpochCallback, Trainer, train
from cawbench.engine.updates import MERGE_MODES, MergedOptimizers, clip_grad_norms_

__all__ = [
    "EXECUTORS", "MERGE_MODES", "BatchStep", "CudaGraphBackend", "EpochCallback", "ExecutorSetup",
    "GraphedSteps", "MergedOptimizers", "PipelineRunner", "ReplayBackend", "ResumeError", "StepState",
    "StepStats", "StreamsStep", "ThreadPipeline", "Trainer", "TrainingDiverged", "UnitState", "autocast",
    "balanced_groups", "build_executor", "clip_grad_norms_", "default_run_name", "executor_name",
    "load_checkpoint", "make_optimizer", "register_executor", "resolve_device", "run_dir_for", "run_thread_pipeline",
    "save_checkpoint", "software_versions", "train", "use_bf16", "weighted_sum", "with_replayed_graphs",
]  # fmt: skip
