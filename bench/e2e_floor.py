"""The computed floor of bench/e2e.py: how fast a configuration could run if every part ran at its
ceiling, and the two ceilings measured in the same run.

Prefill (``logits_to_keep=1``): the linear layers at the bf16 matmul rate measured on this device
for the model's own weight shapes; each FA layer at ``attn_tflops`` (default 650 TFLOP/s, what a
Hopper FlashAttention-3-class kernel reaches) over its causal (query, key) pairs; each SA layer at
the same rate over the pairs the streaming rule lets it visit. Elementwise work (norms, RoPE, SiLU,
residuals) is left out, so the floor is below what any implementation reaches.

Decode (one token per sequence): bytes read per step (every weight except the embedding table,
whose B rows only are read, plus each layer's K/V that the step attends to: all of it for an FA
layer, sink + window for an SA layer) at the device copy ceiling (bytes moved by a large
``copy_`` per second).

Attention FLOPs: 4 * pairs * Hq * D (QK^T and PV, 2 FLOPs per multiply-add).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Dict, List, Tuple

import torch


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the floors need to know about the model."""

    hidden: int
    intermediate: int
    layers: int
    heads_q: int
    heads_kv: int
    head_dim: int
    vocab: int
    elem_bytes: int  # bytes per weight / KV element (2 for bf16)

    @classmethod
    def of(cls, config, elem_bytes: int) -> "ModelShape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, head_dim,
                   config.vocab_size, elem_bytes)

    def linear_shapes(self) -> List[Tuple[int, int, int]]:
        """(in features, out features, count per decoder layer) of every linear layer."""
        q, kv = self.heads_q * self.head_dim, self.heads_kv * self.head_dim
        return [(self.hidden, q, 1), (self.hidden, kv, 2), (q, self.hidden, 1),  # q, k+v, o
                (self.hidden, self.intermediate, 2), (self.intermediate, self.hidden, 1)]  # gate+up, down

    def kv_bytes_per_token(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.heads_kv * self.head_dim * self.elem_bytes

    def weight_bytes_per_step(self, batch: int) -> int:
        """Weights a decode step reads: decoder layers, final norm, LM head; B embedding rows."""
        per_layer = sum(i * o * c for i, o, c in self.linear_shapes()) + 2 * self.hidden  # + 2 norms
        params = self.layers * per_layer + self.hidden + self.vocab * self.hidden + batch * self.hidden
        return params * self.elem_bytes


@dataclasses.dataclass(frozen=True)
class Pattern:
    sink_tokens: int
    local_blocks: int
    block_size: int


def visible_keys(positions: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keys the streaming rule lets the query at each position see (int64, causal)."""
    t = positions.to(torch.int64)
    sink_end = torch.clamp(torch.full_like(t, pattern.sink_tokens), max=t + 1)
    window_lo = torch.clamp((t // pattern.block_size - (pattern.local_blocks - 1)) * pattern.block_size, min=0)
    local_start = torch.maximum(window_lo, sink_end)
    return sink_end + (t + 1 - local_start)


def fa_pairs(length: int) -> int:
    return length * (length + 1) // 2


def sa_pairs(length: int, pattern: Pattern) -> int:
    return int(visible_keys(torch.arange(length), pattern).sum())


def attention_ms(pairs: int, shape: ModelShape, tflops: float) -> float:
    return 4.0 * pairs * shape.heads_q * shape.head_dim / (tflops * 1e12) * 1e3


def prefill_floor_ms(length: int, sa_layers: int, shape: ModelShape, linear_ms_per_token: float,
                     pattern: Pattern, attn_tflops: float) -> Dict[str, float]:
    fa_layers = shape.layers - sa_layers
    linear = linear_ms_per_token * length
    fa = fa_layers * attention_ms(fa_pairs(length), shape, attn_tflops)
    sa = sa_layers * attention_ms(sa_pairs(length, pattern), shape, attn_tflops)
    return {"floor_ms": linear + fa + sa, "linear_ms": linear, "fa_ms": fa, "sa_ms": sa}


def decode_step_bytes(context: int, batch: int, sa_layers: int, shape: ModelShape,
                      pattern: Pattern) -> Dict[str, int]:
    """Bytes read by one decode step whose new token sits at position ``context``."""
    fa_layers = shape.layers - sa_layers
    tokens_fa = context + 1
    tokens_sa = int(visible_keys(torch.tensor([context]), pattern)[0])
    kv = batch * shape.kv_bytes_per_token() * (fa_layers * tokens_fa + sa_layers * tokens_sa)
    weights = shape.weight_bytes_per_step(batch)
    return {"weights": weights, "kv": kv, "total": weights + kv}


# ---------------------------------------------------------------------------------------------
# the ceilings, measured


def _time_ms(fn, device: torch.device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        samples = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
    samples.sort()
    return samples[len(samples) // 2]


def measure_linear(shape: ModelShape, device: torch.device, dtype: torch.dtype, tokens: int,
                   reps: int = 5) -> Dict[str, object]:
    """Milliseconds per token of all linear layers (one decoder stack), from ``x @ W^T`` timed at
    ``tokens`` rows for each distinct weight shape."""
    per_shape = []
    total_ms = 0.0
    flops = 0
    for fan_in, fan_out, count in shape.linear_shapes():
        x = torch.randn(tokens, fan_in, device=device, dtype=dtype)
        w = torch.randn(fan_out, fan_in, device=device, dtype=dtype)
        ms = _time_ms(lambda: torch.nn.functional.linear(x, w), device, reps)
        per_shape.append({"in": fan_in, "out": fan_out, "ms": ms,
                          "tflops": 2 * tokens * fan_in * fan_out / (ms * 1e-3) / 1e12})
        total_ms += ms * count * shape.layers
        flops += 2 * tokens * fan_in * fan_out * count * shape.layers
        del x, w
    return {"tokens": tokens, "ms_per_token": total_ms / tokens,
            "tflops": flops / (total_ms * 1e-3) / 1e12, "shapes": per_shape}


def measure_copy(device: torch.device, nbytes: int, reps: int = 5) -> Dict[str, float]:
    """Device copy ceiling: bytes read + written by ``dst.copy_(src)`` per second."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, reps)
    return {"bytes": nbytes, "ms": ms, "tb_s": 2 * nbytes / (ms * 1e-3) / 1e12}
