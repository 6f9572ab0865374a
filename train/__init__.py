"""Router training for Flux Attention: frozen base model, per-task sparsity targets, torchrun data
parallelism, exact resume. Entry point: ``python -m train --config configs/tiny.yaml``; see
docs/training.md."""

from .config import TASK_CLASSES, ConfigError, JobConfig, load_config

__all__ = ["TASK_CLASSES", "ConfigError", "JobConfig", "load_config"]
