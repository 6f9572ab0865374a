"""Fused kernels for the rest of the transformer block: ``fuse_ops(model)`` / ``unfuse_ops(model)``.

Routing shrinks attention; what remains of a layer is its linear layers and the memory-bound ops
between them, which transformers writes as several PyTorch passes each: an fp32 RMSNorm (to fp32,
square, mean, rsqrt, multiply, back to bf16, times the weight), ``silu(gate) * up``, and the rotary
embedding through ``rotate_half``'s slices and ``cat``. At the Llama-3.1-8B shape and 128K tokens
those passes cost ~25 ms per layer, ~0.8 s of a prefill (docs/perf_notes.md "Model ops"). With
``fuse_ops`` each is one kernel that reads its inputs once and writes once (fp32 math, one rounding:
at least as accurate as the unfused code).

What is patched, for the Llama family (Llama, Mistral, Qwen2, Qwen3; SmolLM2 is a Llama):

- every ``*RMSNorm`` module of those models (including Qwen3's q/k norms): its ``forward``
  (modules whose forward is already replaced on the instance, e.g. by accelerate's offloading
  hooks, are left alone);
- every ``*MLP`` with ``gate_proj``, ``up_proj``, ``down_proj`` and a SiLU ``act_fn``: its ``forward``
  (the three projections stay the model's own modules, so quantised or adapted linears still work);
- the ``apply_rotary_pos_emb`` function of the model's modeling module. That is a module global, so
  it applies to every model of that class in the process; it computes the same function;
- at decode (CUDA inputs with 1-8 token rows: batch <= 8), the model's plain ``nn.Linear`` layers
  (q/k/v/o, down_proj, lm_head) run ``decode_linear`` and the MLP's gate and up projections run
  ``decode_swiglu`` with the SiLU fused in: tensor-core weight streams that read an 8B layer at
  3.4-3.6 TB/s where cuBLAS's small-M kernels reach ~3.1, the smaller matrices at 1.1-2.5 TB/s
  (docs/perf_notes.md "Decode linear layers"). An attention module's q, k and v projections read
  the same hidden states: at decode the first of them to run streams all three weights in one
  ``decode_linear_group`` launch, and the other two return its outputs when they are called on that
  very tensor (``_ProjectionGroup``). ``decode_linears=False`` leaves linears to cuBLAS.
  Subclasses of ``nn.Linear`` (quantised, LoRA) are never patched.

Each fused forward is used only where it is exact in meaning: inference (no gradient needed:
``torch.no_grad()``, or inputs that do not require grad), dtypes the kernels support, the layouts
transformers produces. Anything else runs the module's original code, so router training, which
backpropagates through the frozen model, is unaffected. ``unfuse_ops`` restores the originals.
"""

from __future__ import annotations

import sys
import types
import weakref
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["fuse_ops", "unfuse_ops"]

_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# modeling module name -> its original apply_rotary_pos_emb, and how many fused models use it.
_ROPE_ORIGINALS: Dict[str, list] = {}


def _family_module(mod: nn.Module) -> bool:
    name = type(mod).__module__
    return name.startswith("transformers.models.") and name.split(".")[2] in _FAMILIES


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _fusable(*tensors: Tensor) -> bool:
    ref = tensors[0]
    return (ref.dtype in _DTYPES and ref.device.type in ("cuda", "cpu")
            and all(t.dtype == ref.dtype and t.device == ref.device for t in tensors)
            and not _needs_grad(*tensors))


def _norm_forward(self, hidden_states: Tensor) -> Tensor:
    if _fusable(hidden_states, self.weight) and hidden_states.shape[-1] == self.weight.shape[0]:
        return ops.rms_norm(hidden_states, self.weight, float(self.variance_epsilon))
    return self._flux_unfused_forward(hidden_states)


# The decode kernels' token-row capacity (kDecodeLinearMaxRows in csrc/include/flux/model_ops.h).
DECODE_LINEAR_MAX_ROWS = 8


def _decode_rows(x: Tensor) -> bool:
    """CUDA input with 1-8 token rows (a decode step at batch <= 8, or a prefill's last-token
    lm_head): where the decode kernels beat cuBLAS, 1.08-1.14x per 8B layer on the H200
    (docs/perf_notes.md "Decode linear layers"). More rows are a GEMM: cuBLAS keeps those."""
    if not x.is_cuda or x.dim() < 1 or x.shape[-1] == 0:
        return False
    return x.numel() // x.shape[-1] <= DECODE_LINEAR_MAX_ROWS


def _plain_linear(mod) -> bool:
    return type(mod) is nn.Linear  # not a subclass: quantised or adapted linears keep their forward


def _linear_forward(self, x: Tensor) -> Tensor:
    if _decode_rows(x) and _fusable(x, self.weight, *(() if self.bias is None else (self.bias,))):
        return ops.decode_linear(x, self.weight, self.bias)
    return self._flux_unfused_forward(x)


class _ProjectionGroup:
    """The q, k and v projections of one attention module, which transformers calls one after the
    other on the same hidden states. At decode the first member to run computes all three outputs
    in one ``decode_linear_group`` launch (at the 8B shape k_proj alone is 8 MB: its launch's fixed
    cost exceeds its traffic) and keeps the other two; a member returns its kept output only when
    called on the very tensor the group read (the same object, unmodified since: same
    ``_version``), and computes its own otherwise. The group holds that tensor until both kept
    outputs are taken or the next group launch replaces them, so its memory cannot be reused
    under the identity check."""

    def __init__(self, linears: List[nn.Linear]):
        self._linears = [weakref.ref(m) for m in linears]
        self._x: Optional[Tensor] = None
        self._version = -1
        self._kept: Dict[int, Tensor] = {}

    def take(self, index: int, x: Tensor) -> Optional[Tensor]:
        if self._x is not x or x._version != self._version or index not in self._kept:
            return None
        out = self._kept.pop(index)
        if not self._kept:
            self._x = None
        return out

    def compute(self, index: int, x: Tensor) -> Optional[Tensor]:
        mods = [ref() for ref in self._linears]
        if any(m is None for m in mods):
            return None
        weights = [m.weight for m in mods]
        biases = [m.bias for m in mods]
        if not _fusable(x, *weights, *(b for b in biases if b is not None)):
            return None
        outs = ops.decode_linear_group(x, weights, biases)
        self._x, self._version = x, x._version
        self._kept = {i: out for i, out in enumerate(outs) if i != index}
        return outs[index]


def _grouped_linear_forward(self, x: Tensor) -> Tensor:
    if _decode_rows(x):
        group, index = self._flux_group, self._flux_group_index
        out = group.take(index, x)
        if out is None:
            out = group.compute(index, x)
        if out is not None:
            return out
    return _linear_forward(self, x)


def _group_projections(mod: nn.Module) -> Optional[List[nn.Linear]]:
    """``mod``'s q/k/v projections when all three were patched by fuse_ops and read one input width."""
    projections = [getattr(mod, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    if not all(_plain_linear(p) and hasattr(p, "_flux_unfused_forward") and not hasattr(p, "_flux_group")
               for p in projections):
        return None
    if len({p.in_features for p in projections}) != 1:
        return None
    return projections


def _mlp_forward(self, x: Tensor) -> Tensor:
    if (getattr(self, "_flux_decode_swiglu", False) and _decode_rows(x)
            and self.gate_proj.bias is None and self.up_proj.bias is None
            and self.gate_proj.weight.shape == self.up_proj.weight.shape
            and _fusable(x, self.gate_proj.weight, self.up_proj.weight)):
        return self.down_proj(ops.decode_swiglu(x, self.gate_proj.weight, self.up_proj.weight))
    gate, up = self.gate_proj(x), self.up_proj(x)
    if _fusable(gate, up):
        return self.down_proj(ops.silu_mul(gate, up))
    return self.down_proj(self.act_fn(gate) * up)


def _is_norm(mod: nn.Module) -> bool:
    return (type(mod).__name__.endswith("RMSNorm") and isinstance(getattr(mod, "weight", None), Tensor)
            and hasattr(mod, "variance_epsilon") and getattr(mod, "weight").dim() == 1)


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _is_mlp(mod: nn.Module) -> bool:
    return (type(mod).__name__.endswith("MLP") and all(
        isinstance(getattr(mod, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
        and _is_silu(getattr(mod, "act_fn", None)))


def _make_rope(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        plain = (args in ((), (1,)) and not kwargs) or (not args and kwargs == {"unsqueeze_dim": 1})
        if (plain and isinstance(q, Tensor) and q.dim() == 4
                and isinstance(k, Tensor) and k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape
                and cos.shape[-1] == q.shape[-1] == k.shape[-1] and q.shape[-1] % 2 == 0
                and q.stride(-1) == 1 and k.stride(-1) == 1 and _fusable(q, k, cos, sin)):
            return ops.rotary_embedding(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._flux_original = original
    apply_rotary_pos_emb.__doc__ = original.__doc__
    return apply_rotary_pos_emb


def fuse_ops(model: nn.Module, *, decode_linears: bool = True) -> Dict[str, int]:
    """Route ``model``'s RMSNorms, SwiGLU MLPs and rotary embedding, and at decode its linear
    layers, through the fused kernels (inference only; see the module docstring). Idempotent.
    Returns how many of each it patched: ``{"rms_norm": n, "mlp": n, "rope": n, "linear": n,
    "qkv": n}`` (rope: modeling modules; qkv: attention modules whose q/k/v projections run as one
    group at decode). Models outside the Llama family are left as they are (all 0)."""
    counts = {"rms_norm": 0, "mlp": 0, "rope": 0, "linear": 0, "qkv": 0}
    rope_modules = set()
    for mod in model.modules():
        if not _family_module(mod):
            continue
        if decode_linears:
            for child in mod.children():
                if _plain_linear(child) and "forward" not in vars(child):
                    child._flux_unfused_forward = child.forward
                    child.forward = types.MethodType(_linear_forward, child)
                    counts["linear"] += 1
            projections = _group_projections(mod)
            if projections is not None:
                group = _ProjectionGroup(projections)
                for index, proj in enumerate(projections):
                    proj._flux_group, proj._flux_group_index = group, index
                    proj.forward = types.MethodType(_grouped_linear_forward, proj)
                counts["qkv"] += 1
        # A module whose forward is already replaced on the instance (accelerate's offloading
        # hooks, another patch) keeps it: fusing would bypass that wrapper.
        patchable = "forward" not in vars(mod)
        if patchable and _is_norm(mod):
            mod._flux_unfused_forward = mod.forward
            mod.forward = types.MethodType(_norm_forward, mod)
            counts["rms_norm"] += 1
        elif patchable and _is_mlp(mod):
            mod._flux_unfused_forward = mod.forward
            mod.forward = types.MethodType(_mlp_forward, mod)
            mod._flux_decode_swiglu = (decode_linears and _plain_linear(mod.gate_proj)
                                       and _plain_linear(mod.up_proj))
            counts["mlp"] += 1
        modeling = sys.modules.get(type(mod).__module__)
        if modeling is not None and callable(getattr(modeling, "apply_rotary_pos_emb", None)):
            rope_modules.add(modeling)
    if getattr(model, "_flux_fused_rope", None) is None:
        for modeling in rope_modules:
            entry = _ROPE_ORIGINALS.get(modeling.__name__)
            if entry is None:
                original = modeling.apply_rotary_pos_emb
                entry = _ROPE_ORIGINALS[modeling.__name__] = [original, 0]
                modeling.apply_rotary_pos_emb = _make_rope(original)
            entry[1] += 1
            counts["rope"] += 1
        model._flux_fused_rope = sorted(m.__name__ for m in rope_modules)
    return counts


def unfuse_ops(model: nn.Module) -> None:
    """Undo ``fuse_ops(model)``: original forwards back; each modeling module's
    ``apply_rotary_pos_emb`` is restored once no fused model uses it."""
    for mod in model.modules():
        if hasattr(mod, "_flux_unfused_forward"):
            del mod.forward  # the instance attribute; the class's forward shows again
            del mod._flux_unfused_forward
        for attr in ("_flux_decode_swiglu", "_flux_group", "_flux_group_index"):
            if hasattr(mod, attr):
                delattr(mod, attr)
    for name in getattr(model, "_flux_fused_rope", None) or ():
        entry = _ROPE_ORIGINALS.get(name)
        if entry is None:
            continue
        entry[1] -= 1
        if entry[1] <= 0:
            setattr(sys.modules[name], "apply_rotary_pos_emb", entry[0])
            del _ROPE_ORIGINALS[name]
    if hasattr(model, "_flux_fused_rope"):
        del model._flux_fused_rope
