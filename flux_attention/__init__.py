"""flux-attention: route each attention layer of a frozen LLM to full or sparse attention per input.

The op library (``torch.ops.flux_attention``) is built from ``csrc/``; the functions below are its
Python entry points. See README.md.
"""

from . import _C
from .ops import (
    decode_attention,
    flux_attention,
    full_attention,
    gumbel_route,
    pool_queries,
    sparse_attention,
)
from .router import LayerRouter, RouterConfig
from .cache import FluxCache
from .hf import (
    attach_router,
    collect_sparsity,
    detach_router,
    register,
    routing_report,
    set_router_temperature,
)
from .checkpoint import load_router, save_router

__version__ = "0.1.0"


def build_info() -> dict:
    """How the extension was built: ``{"cuda": bool, "cuda_runtime": int, "cuda_archs": str, ...}``."""
    return dict(_C.build_info())


__all__ = [
    "build_info",
    "decode_attention",
    "flux_attention",
    "full_attention",
    "gumbel_route",
    "pool_queries",
    "sparse_attention",
    "LayerRouter",
    "RouterConfig",
    "FluxCache",
    "attach_router",
    "collect_sparsity",
    "detach_router",
    "register",
    "routing_report",
    "set_router_temperature",
    "load_router",
    "save_router",
]
