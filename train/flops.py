"""FLOP and memory model of one training step: what a well-made step must compute, so that the
measured tokens/s can be read against it (bench/train_throughput.py, docs/training.md).

Conventions (DESIGN.md section 6): a matmul of m x k by k x n is 2mkn FLOPs; attention counts
4 * D FLOPs per visited (query, key) pair per head (QK^T and PV), the causal mask halving the
pairs; an attention backward is 2.5x its forward. What the training step runs (train/):

- forward: every linear layer (2 FLOPs per weight per token), both attention branches in every
  layer (FA causal and SA sink + window: the router's gradient needs both), the output head;
- activation checkpointing recomputes each layer's forward in the backward, except the
  attention ops when ``model.save_attention`` (their outputs are kept);
- backward: activation gradients only (the base is frozen: no weight gradients, 2 FLOPs per weight
  per token instead of 4), and the attention backward of the branch each sequence took
  (``flux_attention.mix``; the other branch is multiplied by a hard 0); layer 0 has no attention
  backward (its q, k, v come from the frozen embeddings: nothing below needs a gradient);
- the head's gradient is formed in its forward (``train.loss.head_loss``): one projection
  forward plus one ``dlogits @ W``, nothing recomputed;
- KL distillation adds a forward without gradients of the all-FA model (linears, FA, the head).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Sequence

import torch

__all__ = ["Shape", "attention_pairs", "step_flops", "step_memory"]

BACKWARD_FACTOR = 2.5  # attention backward / forward FLOPs (FlashAttention's convention)


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> "Shape":
        """From a transformers ``LlamaConfig``-like object (or a dict of its fields)."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else \
            (lambda k, d=None: getattr(config, k, d))
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        return cls(hidden, get("intermediate_size"), get("num_hidden_layers"), heads,
                   get("num_key_value_heads") or heads, get("head_dim") or hidden // heads,
                   get("vocab_size"))

    @property
    def layer_weights(self) -> int:
        """Weights of one decoder layer's matmuls (q, k, v, o, gate, up, down)."""
        h, d = self.hidden, self.head_dim
        return h * self.heads * d * 2 + h * self.kv_heads * d * 2 + 3 * h * self.intermediate


def attention_pairs(seqlens: Sequence[int], sink_tokens: int = 0, local_blocks: int = 0,
                    block_size: int = 128, sparse: bool = False) -> int:
    """Visited (query, key) pairs of causal attention over packed sequences (per head), or of the
    streaming SA pattern (``sparse``): query t of block r sees keys j <= t with j < sink_tokens or
    j // block_size >= r - (local_blocks - 1)."""
    total = 0
    for n in seqlens:
        if not sparse:
            total += n * (n + 1) // 2
            continue
        t = torch.arange(n, dtype=torch.int64)
        lo = ((t // block_size - (local_blocks - 1)).clamp(min=0)) * block_size
        total += int(((t - lo + 1) + torch.minimum(lo, torch.tensor(sink_tokens))).sum())
    return total


def step_flops(shape: Shape, seqlens: Sequence[int], sink_tokens: int, local_blocks: int,
               block_size: int, sa_fraction: float = 0.0, checkpointing: bool = True,
               save_attention: bool = True, kl: bool = False) -> Dict[str, float]:
    """FLOPs of one pack of ``seqlens`` through a training step, by component, and ``total``.

    ``sa_fraction``: share of (sequence, layer) pairs routed to SA (whose backward is the cheap
    one); 0 = every layer on FA, the worst case and the state of an FA-biased start."""
    tokens = sum(seqlens)
    s, d = shape, shape.head_dim
    linear = 2.0 * s.layer_weights * s.layers * tokens
    head = 2.0 * s.hidden * s.vocab * tokens
    fa = 4.0 * d * s.heads * s.layers * attention_pairs(seqlens)
    sa = 4.0 * d * s.heads * s.layers * attention_pairs(seqlens, sink_tokens, local_blocks, block_size, True)
    out = {
        "linear_forward": linear,
        "attention_forward": fa + sa,
        "head": 2 * head,  # logits + dlogits @ W, both in the head's forward
        "linear_recompute": linear if checkpointing else 0.0,
        "attention_recompute": (fa + sa) if checkpointing and not save_attention else 0.0,
        # activation gradients only; layer 0's q, k, v (from the frozen embeddings) need none
        "linear_backward": linear - 2.0 * tokens * s.hidden * (s.heads + 2 * s.kv_heads) * d,
        "attention_backward": BACKWARD_FACTOR * ((1 - sa_fraction) * fa + sa_fraction * sa) * (s.layers - 1) / s.layers,
        "teacher_forward": (linear + fa + head) if kl else 0.0,
    }
    out["total"] = sum(out.values())
    out["tokens"] = float(tokens)
    out["per_token"] = out["total"] / max(tokens, 1)
    return out


def step_memory(shape: Shape, tokens: int, dtype_bytes: int = 2, cp: int = 1, fsdp_ranks: int = 1,
                checkpointing: bool = True, save_attention: bool = True, logit_chunk: int = 4096,
                kl: bool = False) -> Dict[str, float]:
    """Rough peak device memory (GiB) of one rank for a pack of ``tokens`` (whole pack; a
    context-parallel rank holds ``tokens / cp`` of every per-token tensor).

    Counts the frozen weights, the tensors kept from the forward until the backward (each
    checkpointed layer's input and, with ``save_attention``, the FA and SA outputs with their
    log-sum-exps), the head's input gradient, and the largest transient (one layer's recomputed
    activations during its backward, or the head's fp32 logit chunks). Ignores the allocator's
    fragmentation and the library workspaces."""
    gib = 2.0 ** 30
    t = tokens / cp
    s = shape
    layer_w = s.layer_weights + 2 * s.hidden  # + the two norms
    weights = (layer_w * s.layers / fsdp_ranks + 2 * s.vocab * s.hidden + s.hidden) * dtype_bytes
    if fsdp_ranks > 1:
        weights += 2 * layer_w * dtype_bytes  # two layers unsharded at a time (current + prefetch)
    q_row = s.heads * s.head_dim * dtype_bytes
    attn_kept = 2 * (t * q_row + s.heads * t * 4) if save_attention else 0.0
    if checkpointing:
        kept = s.layers * (t * s.hidden * dtype_bytes + attn_kept)
        # one layer in backward: norms, q/k/v, attention outputs and grads, MLP gate/up/act/product
        layer_live = t * dtype_bytes * (6 * s.hidden + 4 * s.intermediate) + 2 * attn_kept / 2 + 3 * t * q_row
    else:
        kept = s.layers * t * dtype_bytes * (8 * s.hidden + 4 * s.intermediate)
        layer_live = 0.0
    head_grad = t * s.hidden * dtype_bytes
    teacher = t * s.hidden * dtype_bytes if kl else 0.0
    logits = logit_chunk * s.vocab * (4 * (3 if kl else 2) + dtype_bytes)
    transient = max(layer_live, logits)
    out = {"weights": weights, "kept_activations": kept, "head_grad": head_grad + teacher,
           "transient": transient}
    out = {k: v / gib for k, v in out.items()}
    out["total"] = sum(out.values())
    return out
