"""The training worker: load, quantize, add LoRA, train, checkpoint, evaluate, save. Plain PyTorch + HF.

``fit(spec, report, run)`` is the one entry. It never imports Ray: under Ray the runtime passes a
``report`` that wraps ``ray.train.report``; ``qlora-ray train`` and the tests pass their own.

    loop        the Trainer (setup, train, finish), fit, RunContext, FitResult
    step        one optimizer step; ``model_loss`` is its one model forward
    optim       optimizer, learning-rate schedule, fp16 scaler (TrainParts)
    checkpoint  checkpoints/step_<N>/: save, verify, find, restore
    memory      peak memory per trial
"""

from qlora_ray.train.checkpoint import checkpoint_problem, checkpoints, find_checkpoint, latest_checkpoint
from qlora_ray.train.loop import FitResult, Report, RunContext, Stopped, Trainer, fit
from qlora_ray.train.memory import peak_memory_gb, reset_peak_memory
from qlora_ray.train.optim import lr_factor
from qlora_ray.train.step import NonFiniteLossError, OutOfMemory

__all__ = ["FitResult", "NonFiniteLossError", "OutOfMemory", "Report", "RunContext", "Stopped", "Trainer", "checkpoint_problem",
           "checkpoints", "find_checkpoint", "fit", "latest_checkpoint", "lr_factor", "peak_memory_gb",
           "reset_peak_memory"]
