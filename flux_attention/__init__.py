"""flux-attention: route each attention layer of a frozen LLM to full or sparse attention per input.

The op library (``torch.ops.flux_attention``) is built from ``csrc/``; the functions below are its
Python entry points. See README.md.
"""

import importlib

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from . import _C
from .checkpoint import load_router, save_router
from .fused import fuse_ops, unfuse_ops
from .ops import (
    append_kv,
    decode_attention,
    decode_linear,
    decode_linear_group,
    decode_swiglu,
    flux_attention,
    full_attention,
    gumbel_route,
    pool_queries,
    rms_norm,
    rotary_embedding,
    silu_mul,
    sparse_attention,
)
from .router import LayerRouter, RouterConfig

# The Hugging Face parts import transformers (~0.4 s); they load on first use, so the op library
# stays usable without it.
_LAZY = {
    "FluxCache": ".cache",
    "StaticDecodeLoop": ".decode_loop",
    "attach_router": ".hf",
    "calibrate_routers": ".hf",
    "collect_sparsity": ".hf",
    "detach_router": ".hf",
    "register": ".hf",
    "routing_report": ".hf",
    "set_router_temperature": ".hf",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'flux_attention' has no attribute {name!r}")


__version__ = "0.1.0"


def build_info() -> dict:
    """How the extension was built: ``{"cuda": bool, "cuda_runtime": int, "cuda_archs": str, ...}``."""
    return dict(_C.build_info())


__all__ = [
    "append_kv",
    "build_info",
    "decode_attention",
    "decode_linear",
    "decode_linear_group",
    "decode_swiglu",
    "flux_attention",
    "full_attention",
    "gumbel_route",
    "pool_queries",
    "rms_norm",
    "rotary_embedding",
    "silu_mul",
    "fuse_ops",
    "unfuse_ops",
    "sparse_attention",
    "LayerRouter",
    "RouterConfig",
    "FluxCache",
    "StaticDecodeLoop",
    "attach_router",
    "calibrate_routers",
    "collect_sparsity",
    "detach_router",
    "register",
    "routing_report",
    "set_router_temperature",
    "load_router",
    "save_router",
]
