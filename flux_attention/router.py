"""The Layer Router: one small MLP per attention layer that sends each input sequence to full
attention (FA) or streaming sparse attention (SA) in that layer.

Input: the layer's own pre-RoPE queries (after ``q_norm`` where the model has one), pooled by the
``pool_queries`` op over the first and last ``pool_size`` prompt tokens of each sequence and then
over heads, giving one ``[head_dim]`` vector per sequence. Output: two logits per sequence, index 1 =
FA, index 0 = SA. Training draws a straight-through Gumbel gate (``gumbel_route``); inference takes
the argmax (FA iff ``logit[1] > logit[0]``; a tie goes to SA, as ``gumbel_route`` does).

The module names (``cls_feat_extractor``, ``cls_router_head_agnostic``) and the Sequential indices
are those of the reference implementation, so its saved router weights load by name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import FrozenSet, Optional

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["RouterConfig", "LayerRouter", "spread_layers"]

# Logit gap of the FA-biased start: softmax([0, 4.5])[1] = 1 / (1 + e^-4.5) = 0.989.
FA_BIAS = 4.5


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How the routers pool, decide and what sparse attention means.

    Attributes:
        pool_size: P, the number of leading and trailing prompt tokens pooled (reference: 150).
        sink_tokens: leading tokens every SA query sees; a positive multiple of ``block_size``.
        local_blocks: blocks of the SA window, the query's own block included (16 -> ~2K tokens).
        block_size: SA block granularity; also the page size of :class:`~flux_attention.FluxCache`.
        tau_max, tau_min: Gumbel temperature at the start and after annealing (training only).
        anneal_fraction: share of the training steps over which tau anneals (cosine) to tau_min.
        force: ``None`` (route), ``"fa"`` or ``"sa"``: every layer takes that branch regardless of
            the router (tests, benchmarks, ablations).
        force_sparse_layers: layer indices that always take SA; the other layers follow ``force``
            or the router.
    """

    pool_size: int = 150
    sink_tokens: int = 128
    local_blocks: int = 16
    block_size: int = 128
    tau_max: float = 1.5
    tau_min: float = 1.0
    anneal_fraction: float = 0.6
    force: Optional[str] = None
    force_sparse_layers: FrozenSet[int] = frozenset()

    def __post_init__(self):
        def need(ok, field, what):
            if not ok:
                raise ValueError(f"RouterConfig.{field} {what}; got {getattr(self, field)!r}")

        for name in ("pool_size", "sink_tokens", "local_blocks", "block_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
                 "must be a positive int")
        need(self.sink_tokens % self.block_size == 0, "sink_tokens",
             f"must be a multiple of block_size ({self.block_size}): SA keeps whole sink blocks")
        for name in ("tau_max", "tau_min"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name,
                 "must be a positive finite number")
        need(self.tau_max >= self.tau_min, "tau_max", f"must be >= tau_min ({self.tau_min})")
        need(isinstance(self.anneal_fraction, (int, float)) and 0 < self.anneal_fraction <= 1,
             "anneal_fraction", "must lie in (0, 1]")
        need(self.force in (None, "fa", "sa"), "force", 'must be None, "fa" or "sa"')
        layers = self.force_sparse_layers
        need(isinstance(layers, (set, frozenset, list, tuple)) and
             all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers),
             "force_sparse_layers", "must be a set of non-negative layer indices")
        object.__setattr__(self, "force_sparse_layers", frozenset(layers))

    @property
    def window_tokens(self) -> int:
        """Tokens of the SA local window (``local_blocks * block_size``)."""
        return self.local_blocks * self.block_size

    def temperature(self, step: int, total_steps: int) -> float:
        """Gumbel temperature at optimiser step ``step`` of ``total_steps``: cosine from tau_max to
        tau_min over the first ``ceil(anneal_fraction * total_steps)`` steps, then tau_min."""
        if total_steps <= 0 or step < 0:
            raise ValueError(f"RouterConfig.temperature: need step >= 0 and total_steps > 0; got "
                             f"step={step}, total_steps={total_steps}")
        anneal_steps = math.ceil(self.anneal_fraction * total_steps)
        if step >= anneal_steps:
            return float(self.tau_min)
        cos = 1.0 + math.cos(math.pi * step / anneal_steps)
        return float(self.tau_min + 0.5 * (self.tau_max - self.tau_min) * cos)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["force_sparse_layers"] = sorted(self.force_sparse_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RouterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"RouterConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        if "force_sparse_layers" in d:
            d["force_sparse_layers"] = frozenset(d["force_sparse_layers"])
        return cls(**d)


def spread_layers(num_layers: int, fraction: float) -> FrozenSet[int]:
    """``round(fraction * num_layers)`` layer indices spread evenly over ``range(num_layers)``
    (index ``floor((i + 1/2) * num_layers / count)`` for ``i < count``), for
    ``RouterConfig.force_sparse_layers``: forcing a share of the layers to SA in benchmarks and
    ablations.

    >>> sorted(spread_layers(8, 0.5))
    [1, 3, 5, 7]
    >>> cfg = RouterConfig(force="fa", force_sparse_layers=spread_layers(32, 0.75))  # 24 SA layers
    """
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"spread_layers: num_layers must be a positive int; got {num_layers!r}")
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"spread_layers: fraction must lie in [0, 1]; got {fraction!r}")
    count = math.floor(fraction * num_layers + 0.5)
    return frozenset(math.floor((i + 0.5) * num_layers / count) for i in range(count))


class LayerRouter(nn.Module):
    """Router of one attention layer (592,002 parameters at head_dim 128).

    ``(pooled - feature_shift) / feature_scale`` (buffers; identity unless calibrated) feeds
    ``cls_feat_extractor``: Linear(d, 8d), SiLU, Linear(8d, 2d);
    ``cls_router_head_agnostic``: Linear(2d, 4d), SiLU, Linear(4d, d), SiLU, Linear(d, 2).

    Initialisation is FA-biased: the last Linear has weight 0 and bias ``[0, 4.5]``, so an untrained
    router sends every sequence to FA (P(FA) = 0.989 in training), i.e. the model starts exactly as
    the dense model. The reference defines the same start but never applies it (its routers begin
    from N(0, 0.02) weights at ~50/50); we apply it. The other layers keep PyTorch's Linear init.

    Args:
        head_dim: d, the attention head size of the layer.
        config: the shared :class:`RouterConfig`.
    """

    def __init__(self, head_dim: int, config: Optional[RouterConfig] = None):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"LayerRouter: head_dim must be a positive int; got {head_dim!r}")
        d = head_dim
        self.head_dim = d
        self.config = config if config is not None else RouterConfig()
        self.cls_feat_extractor = nn.Sequential(nn.Linear(d, 8 * d), nn.SiLU(), nn.Linear(8 * d, 2 * d))
        self.cls_router_head_agnostic = nn.Sequential(
            nn.Linear(2 * d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d), nn.SiLU(), nn.Linear(d, 2))
        # Training temperature; the trainer sets it each step from RouterConfig.temperature.
        self.tau = float(self.config.tau_max)
        # Input normalisation (x - shift) / scale, identity unless calibrated (calibrate_routers).
        # Pooled queries of different prompts agree to ~99.5 % in cosine (they share the model's
        # mean query direction); standardised, their task-dependent part becomes O(1).
        self.register_buffer("feature_shift", torch.zeros(d))
        self.register_buffer("feature_scale", torch.ones(d))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        last = self.cls_router_head_agnostic[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, FA_BIAS]))
        self.feature_shift.zero_()
        self.feature_scale.fill_(1.0)

    @torch.no_grad()
    def set_feature_normalization(self, shift: Tensor, scale: Tensor) -> None:
        """Standardise the pooled input as ``(pooled - shift) / scale`` (both ``[head_dim]``,
        ``scale > 0``) before the MLP; :func:`~flux_attention.calibrate_routers` sets them from
        the mean and spread of the pooled queries on training inputs."""
        d = self.head_dim
        if tuple(shift.shape) != (d,) or tuple(scale.shape) != (d,):
            raise ValueError(f"LayerRouter.set_feature_normalization: shift and scale must be "
                             f"[{d}]; got {tuple(shift.shape)} and {tuple(scale.shape)}")
        if not bool(torch.isfinite(shift).all()) or not bool((scale > 0).all() & torch.isfinite(scale).all()):
            raise ValueError("LayerRouter.set_feature_normalization: shift must be finite and scale "
                             "finite and > 0")
        self.feature_shift.copy_(shift)
        self.feature_scale.copy_(scale)

    def pool(self, q_pre_rope: Tensor, attention_mask: Optional[Tensor] = None,
             cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """``[B, S, H, D]`` (+ optional ``[B, S]`` mask) or varlen ``[total, H, D]`` + cu_seqlens
        -> pooled ``[B, D]`` through the ``pool_queries`` op."""
        return ops.pool_queries(q_pre_rope, cu_seqlens, self.config.pool_size,
                                attention_mask=attention_mask)

    def forward(self, pooled: Tensor) -> Tensor:
        """``pooled [B, d]`` -> logits ``[B, 2]`` in the router's dtype (index 1 = FA)."""
        w = self.cls_feat_extractor[0].weight
        x = (pooled.to(self.feature_shift.dtype) - self.feature_shift) / self.feature_scale
        return self.cls_router_head_agnostic(self.cls_feat_extractor(x.to(w.dtype)))

    def gate(self, logits: Tensor) -> Tensor:
        """``z [B]``, 1 = FA: a straight-through Gumbel sample at ``self.tau`` in training mode
        (differentiable), the argmax otherwise."""
        if self.training:
            return ops.gumbel_route(logits, self.tau, True)
        return (logits[:, 1] > logits[:, 0]).to(logits.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, tau={self.tau}"
