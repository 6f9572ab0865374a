"""Hugging Face transformers integration: ``attn_implementation="flux"``.

``register()`` adds ``"flux"`` to transformers' attention interface (and its mask interface, which
makes the model hand the 2D padding mask to the attention function instead of a 4D one).
``attach_router(model, config)`` adds a :class:`~flux_attention.router.LayerRouter` to every
attention module as the registered submodule ``mask_allocator`` (state-dict names match the
reference implementation) and three hooks per module, no model code copied or patched:

- a forward hook on ``q_norm`` (when the module has one) else ``q_proj``: keeps the layer's
  pre-RoPE queries for the router;
- a forward pre-hook on the attention module: finds the cache the layer runs with;
- a forward hook on the attention module: drops what the other two kept.

Per call, :func:`flux_attention_forward` (the ``sdpa_attention_forward`` contract: q/k/v
``[B, H, S, D]`` after RoPE, returns ``(out [B, S, H, D], None)``):

- prefill: unpads the batch to varlen by the 2D mask (left or right padding give what the sequence
  alone gives), pools each sequence's own prompt queries, routes each sequence (argmax in eval,
  straight-through Gumbel in training), runs the ``flux_attention`` op (one launch, per-sequence
  FA/SA) and re-pads. The decision is stored in the cache and reused by later chunks and decode steps.
- decode with :class:`~flux_attention.cache.FluxCache`: writes the new K/V through the block table
  and calls ``decode_attention`` (SA sequences read sink + window only); no host sync.
- any other transformers cache (e.g. ``DynamicCache``): correct but slower (unpads the whole cache
  per step).
- training (router in training mode): both branches, ``out = z * FA + (1 - z) * SA`` per sequence,
  ``z`` the straight-through gate; :func:`collect_sparsity` returns the per-sequence SA fraction.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import ops
from .cache import FluxCache
from .mix import routed_mix
from .router import LayerRouter, RouterConfig

__all__ = [
    "register",
    "flux_attention_forward",
    "flux_attention_mask",
    "attach_router",
    "detach_router",
    "routers",
    "routing_report",
    "RoutingReport",
    "collect_sparsity",
    "calibrate_routers",
    "set_router_temperature",
]

logger = logging.getLogger(__name__)

_ROUTER = "mask_allocator"  # the reference's attribute name, kept so checkpoints load by name
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")  # across transformers versions
_NO_ROUTER_CONFIG = RouterConfig()


# ---------------------------------------------------------------------------------------------
# registration


def flux_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                        mask_function=None, attention_mask: Optional[Tensor] = None, **kwargs):
    """Mask interface for ``"flux"``: the 2D padding mask ``[B, kv_length]`` (bool), or None.

    Flux attention unpads by this mask and applies causality and the streaming rule itself, so
    neither a 4D mask nor its host-side construction is needed."""
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:]


def register() -> None:
    """Make ``attn_implementation="flux"`` known to transformers (idempotent)."""
    try:
        from transformers import AttentionInterface
    except ImportError as e:
        raise ImportError("flux_attention.register needs transformers >= 5.17") from e
    AttentionInterface.register("flux", flux_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(
            "flux_attention.register: this transformers has no AttentionMaskInterface, so the 2D "
            "padding mask cannot reach the attention function; use transformers >= 5.17") from e
    AttentionMaskInterface.register("flux", flux_attention_mask)


# ---------------------------------------------------------------------------------------------
# unpadding


@dataclasses.dataclass
class _Varlen:
    """A batch unpadded by its 2D mask: rows ``indices`` of the flattened ``[B * S]`` layout."""

    indices: Optional[Tensor]  # int64 [total] (None: no padding, rows are the whole batch)
    cu: Tensor  # int32 [B + 1] on the device
    lengths: List[int]  # host
    max_len: int
    seq: Tensor  # int64 [total]: the sequence of each row

    @property
    def total(self) -> int:
        return sum(self.lengths)


_memo: Dict[str, tuple] = {}


def _varlen_from_mask(source, mask: Optional[Tensor], batch: int, seqlen: int, device,
                      slot: str = "q") -> _Varlen:
    """Unpad info for ``mask [B, S]`` (bool, 1 = token) or, without a mask, ``B`` full rows.

    Memoised per ``slot`` on ``source``, the attention_mask object the model passes: every layer
    of one forward gets the same object, so the host reads (lengths, row indices) happen once per
    forward, not once per layer."""
    key = (batch, seqlen, str(device), getattr(source, "_version", None))
    hit = _memo.get(slot)
    if hit is not None and hit[0] is source and hit[1] == key:
        return hit[2]
    if mask is None:
        lengths = [seqlen] * batch
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
        seq = torch.arange(batch, device=device).repeat_interleave(seqlen)
        info = _Varlen(None, cu, lengths, seqlen, seq)
    else:
        if mask.shape != (batch, seqlen):
            raise ValueError(f"flux attention: the padding mask is {tuple(mask.shape)}, expected "
                             f"[{batch}, {seqlen}] for this input")
        m = mask.to(torch.bool)
        # A row is one contiguous run of tokens iff it has at most one 0->1 edge (left or right
        # padding); holes would make the row two sequences glued together.
        edges = (m[:, 1:] & ~m[:, :-1]).sum(1) + m[:, 0]
        stats = torch.stack([m.sum(1), edges]).tolist()
        lengths = [int(n) for n in stats[0]]
        if any(e > 1 for e in stats[1]):
            raise ValueError("flux attention: each row of attention_mask must be one contiguous run "
                             "of tokens (left or right padding); got a row with holes")
        indices = m.flatten().nonzero().flatten()
        cu_host = torch.zeros(batch + 1, dtype=torch.int32)
        cu_host[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        cu = cu_host.to(device)
        seq = torch.div(indices, seqlen, rounding_mode="floor")
        info = _Varlen(indices, cu, lengths, max(lengths, default=0), seq)
    _memo[slot] = (source, key, info)
    return info


def _unpad(x: Tensor, vl: _Varlen) -> Tensor:
    """``x [B, H, S, D]`` -> varlen ``[total, H, D]``."""
    b, h, s, d = x.shape
    rows = x.transpose(1, 2).reshape(b * s, h, d)
    return rows if vl.indices is None else rows.index_select(0, vl.indices)


def _repad(out: Tensor, vl: _Varlen, batch: int, seqlen: int) -> Tensor:
    """varlen ``[total, H, D]`` -> ``[B, S, H, D]``, zeros at padding."""
    h, d = out.shape[1:]
    if vl.indices is None:
        return out.view(batch, seqlen, h, d)
    full = out.new_zeros(batch * seqlen, h, d).index_copy(0, vl.indices, out)
    return full.view(batch, seqlen, h, d)


# ---------------------------------------------------------------------------------------------
# routing and attention


def _decide(module: nn.Module, router: Optional[LayerRouter], batch: int, device,
            pool_args: Optional[tuple]) -> Tuple[Tensor, Tensor, bool]:
    """``(z [B] float, 1 = FA; use_sparse [B] bool; learned)`` for this layer and batch.

    ``pool_args`` = (q_pre_rope, attention_mask, cu_seqlens) for the router's pooling."""
    if router is None:
        z = torch.ones(batch, device=device)
        return z, torch.zeros(batch, dtype=torch.bool, device=device), False
    forced = _forced(module, router)
    if forced is not None:
        fa = forced == "fa"
        z = torch.full((batch,), 1.0 if fa else 0.0, device=device)
        return z, torch.full((batch,), not fa, dtype=torch.bool, device=device), False
    if pool_args is None or pool_args[0] is None:
        raise RuntimeError(
            f"flux attention (layer {module.layer_idx}): the pre-RoPE queries were not captured; "
            "attach_router(model, ...) installs the hook on q_norm/q_proj, and the module must call "
            "it in this forward")
    q_pre, mask, cu = pool_args
    logits = router(router.pool(q_pre, attention_mask=mask, cu_seqlens=cu))
    z = router.gate(logits)
    return z, z < 0.5, True


def _forced(module: nn.Module, router: Optional[LayerRouter]) -> Optional[str]:
    """``"fa"`` / ``"sa"`` when this layer's decision is fixed by the config (no router: FA)."""
    if router is None:
        return "fa"
    cfg = router.config
    return "sa" if module.layer_idx in cfg.force_sparse_layers else cfg.force


def _heads(q_pre: Optional[Tensor], lead: int, head_dim: int) -> Optional[Tensor]:
    """Captured pre-RoPE queries ``[*lead, Hq * D]`` or ``[*lead, Hq, D]`` -> ``[*lead, Hq, D]``."""
    return None if q_pre is None else q_pre.reshape(*q_pre.shape[:lead], -1, head_dim)


def _attend(q: Tensor, k: Tensor, v: Tensor, cfg: RouterConfig, scale: Optional[float],
            use_sparse: Tensor, z: Optional[Tensor], vq: Optional[_Varlen],
            cu_k: Optional[Tensor] = None, max_k: Optional[int] = None) -> Tensor:
    """One attention call. Padded ``[B, S, H, D]`` (``vq`` None) or varlen with ``vq`` (and
    ``cu_k``/``max_k`` when keys differ from queries). ``z`` given: training mix of both branches."""
    kw = {"scale": scale}
    if vq is not None:
        kw.update(cu_seqlens_q=vq.cu, cu_seqlens_k=vq.cu if cu_k is None else cu_k,
                  max_seqlen_q=vq.max_len, max_seqlen_k=vq.max_len if max_k is None else max_k)
    pattern = {"sink_tokens": cfg.sink_tokens, "local_blocks": cfg.local_blocks,
               "block_size": cfg.block_size}
    if z is None:
        return ops.flux_attention(q, k, v, use_sparse, **kw, **pattern)[0]
    # Both forwards, the backward of the taken branch only (z is hard): see flux_attention.mix.
    return routed_mix(q, k, v, z, **kw, **pattern)


def _record(module: nn.Module, z: Tensor, use_sparse: Tensor, learned: bool) -> None:
    module._flux_route = {"z": z, "use_sparse": use_sparse.detach(), "learned": learned}


def _padding_mask(attention_mask, batch: int, kv_len: int) -> Optional[Tensor]:
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask)
        raise ValueError(
            f"flux attention needs the 2D padding mask [batch, keys]; got {shape}. Call "
            "flux_attention.register() before building the model, and pass a 2D attention_mask")
    if attention_mask.shape[0] != batch or attention_mask.shape[1] < kv_len:
        raise ValueError(f"flux attention: attention_mask {tuple(attention_mask.shape)} does not "
                         f"cover [{batch}, {kv_len}] keys")
    return attention_mask[:, -kv_len:].to(torch.bool)


def flux_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Optional[Tensor], dropout: float = 0.0,
                           scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                           **kwargs) -> Tuple[Tensor, None]:
    """transformers attention function for ``attn_implementation="flux"``.

    Args:
        module: the attention module (``layer_idx``; the router as ``module.mask_allocator``).
        query: ``[B, Hq, S, D]`` after RoPE; key, value: ``[B, Hkv, S_kv, D]`` (what the cache's
            ``update`` returned).
        attention_mask: the 2D padding mask ``[B, >= S_kv]`` (bool) or None.
        dropout: must be 0 (no attention dropout).
        scaling: softmax scale (default ``1/sqrt(D)``).
        is_causal: must not be False: both branches are causal.
        kwargs: ``cu_seq_lens_q/k`` and ``max_length_q/k`` (packed varlen input without cache),
            ``sliding_window`` (refused when the input is longer), the rest ignored.

    Returns:
        ``(out [B, S, Hq, D], None)``.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("flux attention does not support softcap")
    if is_causal is False or getattr(module, "is_causal", True) is False:
        raise ValueError(f"flux attention is causal only; layer {getattr(module, 'layer_idx', '?')} "
                         "asked for non-causal attention")
    if dropout and module.training:
        raise ValueError("flux attention does not implement attention dropout; set "
                         "config.attention_dropout = 0")
    batch, heads_q, seqlen, head_dim = query.shape
    kv_len = key.shape[2]
    window = kwargs.get("sliding_window")
    router: Optional[LayerRouter] = module._modules.get(_ROUTER)  # (nn.Module.__getattr__ is slow)
    cfg = router.config if router is not None else _NO_ROUTER_CONFIG
    cache = module.__dict__.get("_flux_cache")
    # Pre-RoPE queries as captured ([B, S, Hq * D] or [B, S, Hq, D]); split into heads only where
    # a router reads them (not at decode).
    q_pre = module.__dict__.pop("_flux_q", None)
    if router is None:
        _warn_no_router()

    if isinstance(cache, FluxCache):
        layer = cache.layer(module.layer_idx)
        layer.consumed()
        if window is not None and layer.seen > window:
            _refuse_window(module, window, layer.seen)
        if router is not None and router.training:
            raise RuntimeError("FluxCache is for inference: call model.eval() (the routers are in "
                               "training mode)")
        return _with_flux_cache(module, router, cfg, cache, layer, query, key, value, attention_mask,
                                scaling, q_pre), None

    if window is not None and kv_len > window:
        _refuse_window(module, window, kv_len)
    train = router is not None and router.training

    if "cu_seq_lens_q" in kwargs and kwargs["cu_seq_lens_q"] is not None:
        return _packed(module, router, cfg, query, key, value, scaling, q_pre, kwargs, train), None

    mask = _padding_mask(attention_mask, batch, kv_len)
    past = kv_len - seqlen
    store = None
    if cache is not None:
        if getattr(cache, "is_compileable", False):
            raise ValueError("flux attention works with FluxCache or a dynamic transformers cache; "
                             f"got {type(cache).__name__} (static caches are not supported)")
        store = cache.__dict__.setdefault("_flux_use_sparse", {})
    mask_q = mask[:, -seqlen:] if mask is not None else None
    vq = None if mask is None else _varlen_from_mask(attention_mask, mask_q, batch, seqlen, query.device)

    known = store.get(module.layer_idx) if store is not None and past > 0 else None
    if known is not None:
        use_sparse, z = known, None
    else:
        z, use_sparse, learned = _decide(module, router, batch, query.device,
                                         (_heads(q_pre, 2, head_dim), mask_q, None))
        _record(module, z, use_sparse, learned)
        if store is not None:
            store[module.layer_idx] = use_sparse.detach()
        if not (train and learned):
            z = None

    if mask is None:
        # No padding: the ops read the [B, S, H, D] views directly, bottom-right aligned.
        out = _attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), cfg,
                      scaling, use_sparse, z, None)
        return out, None
    if past == 0:
        out = _attend(_unpad(query, vq), _unpad(key, vq), _unpad(value, vq), cfg, scaling,
                      use_sparse, z, vq)
    else:
        vk = _varlen_from_mask(attention_mask, mask, batch, kv_len, query.device, slot="k")
        out = _attend(_unpad(query, vq), _unpad(key, vk), _unpad(value, vk), cfg, scaling,
                      use_sparse, z, vq, cu_k=vk.cu, max_k=vk.max_len)
    return _repad(out, vq, batch, seqlen), None


def _with_flux_cache(module, router, cfg: RouterConfig, cache: FluxCache, layer, query, key, value,
                     attention_mask, scaling, q_pre) -> Tensor:
    batch, heads_q, seqlen, head_dim = query.shape
    pattern = {"sink_tokens": cfg.sink_tokens, "local_blocks": cfg.local_blocks,
               "block_size": cfg.block_size}
    if router is None:
        raise RuntimeError("FluxCache needs routers: call flux_attention.attach_router(model, ...)")
    if layer.started and layer.batch != batch:
        raise ValueError(f"FluxCache holds a batch of {layer.batch} sequences; this forward has "
                         f"{batch}. Use a fresh FluxCache per batch")

    if layer.started and seqlen == 1:
        # Decode: every sequence gains one token (what generate does); device work only, planned
        # once per step for all layers by the cache.
        cache.append_decode(module.layer_idx, key[:, :, 0], value[:, :, 0])
        out, _ = ops.decode_attention(query[:, :, 0], layer.k_pages, layer.v_pages,
                                      layer.cache_seqlens, block_table=layer.block_table,
                                      use_sparse=layer.use_sparse, scale=scaling, **pattern)
        return out.unsqueeze(1)

    cache.end_decode()  # a prefill chunk: per-layer lengths change, layer by layer
    mask = None
    if attention_mask is not None:
        mask = _padding_mask(attention_mask, batch, attention_mask.shape[1])[:, -seqlen:]
    vq = _varlen_from_mask(attention_mask, mask, batch, seqlen, query.device)
    q_v, k_v, v_v = _unpad(query, vq), _unpad(key, vq), _unpad(value, vq)

    if not layer.started:
        z, use_sparse, learned = _decide(module, router, batch, query.device,
                                         (_heads(q_pre, 2, head_dim), mask, None))
        _record(module, z, use_sparse, learned)
        forced = _forced(module, router)  # known on the host: no device read (no sync) needed
        layer.start(batch, use_sparse, num_heads_k=key.shape[1], head_dim=head_dim,
                    use_sparse_host=None if forced is None else [forced == "sa"] * batch, **pattern)
        out = _attend(q_v, k_v, v_v, cfg, scaling, use_sparse, None, vq)
        layer.append_varlen(k_v, v_v, vq.cu, vq.lengths)
        return _repad(out, vq, batch, seqlen)

    # A later prefill chunk: keys are everything stored so far (positions kept) plus the chunk.
    k_all, v_all, cu_k, max_k = layer.gather_past(k_v, v_v, vq.cu, vq.lengths)
    out = _attend(q_v, k_all, v_all, cfg, scaling, layer.use_sparse, None, vq, cu_k=cu_k, max_k=max_k)
    layer.append_varlen(k_v, v_v, vq.cu, vq.lengths)
    return _repad(out, vq, batch, seqlen)


def _packed(module, router, cfg, query, key, value, scaling, q_pre, kwargs, train) -> Tensor:
    """Packed varlen input (batch 1, ``cu_seq_lens_q`` in kwargs, no cache): one decision per
    packed sequence."""
    if query.shape[0] != 1:
        raise ValueError(f"flux attention: cu_seq_lens_q needs a packed batch of 1 row; got "
                         f"{query.shape[0]}")
    cu = kwargs["cu_seq_lens_q"].to(torch.int32)
    cu_k = kwargs.get("cu_seq_lens_k")
    if cu_k is not None and not (cu_k.shape == cu.shape and torch.equal(cu_k.to(cu), cu)):
        raise ValueError("flux attention: packed input needs cu_seq_lens_k == cu_seq_lens_q "
                         "(self-attention without a cache)")
    total = query.shape[2]
    max_len = kwargs.get("max_length_q")
    max_len = int(max_len) if max_len is not None else total
    n = cu.shape[0] - 1
    seq = torch.repeat_interleave(torch.arange(n, device=cu.device), cu.diff().long(), output_size=total)
    vq = _Varlen(None, cu, [], max_len, seq)
    q_pre_v = None if q_pre is None else _heads(q_pre[0], 1, query.shape[-1])
    z, use_sparse, learned = _decide(module, router, n, query.device, (q_pre_v, None, cu))
    _record(module, z, use_sparse, learned)
    rows = lambda x: x[0].transpose(0, 1)  # noqa: E731  [1, H, T, D] -> [T, H, D]
    out = _attend(rows(query), rows(key), rows(value), cfg, scaling, use_sparse,
                  z if (train and learned) else None, vq)
    return out.unsqueeze(0)


def _refuse_window(module, window: int, length: int):
    raise ValueError(
        f"flux attention: layer {module.layer_idx} uses the model's own sliding window ({window} "
        f"tokens) and the input has {length}; flux attention replaces it with full / streaming "
        "attention, which would change the model. Use a config without sliding_window")


_warned = set()


def _warn_no_router():
    if "router" not in _warned:
        _warned.add("router")
        logger.warning("attn_implementation='flux' without routers: every layer runs full "
                       "attention; call flux_attention.attach_router(model, config)")


# ---------------------------------------------------------------------------------------------
# attaching routers


def _attention_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    found = [(n, m) for n, m in model.named_modules() if n.split(".")[-1] == "self_attn"]
    if not found:
        raise ValueError(
            f"attach_router: {type(model).__name__} has no attention modules named '*.self_attn' "
            "(the standard transformers decoder layout); it cannot be routed")
    for name, m in found:
        missing = [a for a in ("q_proj", "k_proj", "v_proj", "layer_idx") if not hasattr(m, a)]
        if missing:
            raise ValueError(
                f"attach_router: module '{name}' ({type(m).__name__}) does not follow the standard "
                f"transformers attention pattern: it has no {', '.join(missing)}")
        if not isinstance(m.q_proj, nn.Module) or not isinstance(m.layer_idx, int):
            raise ValueError(f"attach_router: module '{name}' ({type(m).__name__}) has a q_proj "
                             "that is not a module or a layer_idx that is not an int")
        if _head_dim(m) is None:
            raise ValueError(f"attach_router: cannot tell the head size of module '{name}' "
                             f"({type(m).__name__}): no head_dim attribute")
    return found


def _head_dim(m: nn.Module) -> Optional[int]:
    d = getattr(m, "head_dim", None)
    if isinstance(d, int) and d > 0:
        return d
    cfg = getattr(m, "config", None)
    if cfg is not None:
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return int(d)
    return None


# The hooks run for every layer and decode step: they write module.__dict__ directly
# (nn.Module.__setattr__ costs several microseconds per call).


def _capture_q(attn):
    def hook(mod, args, output):
        attn.__dict__["_flux_q"] = output
    return hook


def _capture_cache(attn, name):
    def hook(mod, args, kwargs):
        cache = None
        for k in _CACHE_KWARGS:
            if kwargs.get(k) is not None:
                cache = kwargs[k]
                break
        mod.__dict__["_flux_cache"] = cache
        if isinstance(cache, FluxCache):
            layer = cache.layer(mod.layer_idx)
            # The implementation is model-wide: checking it at layer 0 of every forward (and at a
            # layer's first use) catches a switch before any layer runs with the wrong one.
            if mod.layer_idx == 0 or not layer.started:
                impl = getattr(getattr(mod, "config", None), "_attn_implementation", "flux")
                if impl != "flux":
                    raise RuntimeError(f"FluxCache needs attn_implementation='flux'; module '{name}' "
                                       f"runs '{impl}' (model.set_attn_implementation('flux'))")
            layer.arm()
    return hook


def _release(mod, args, output):
    mod.__dict__.pop("_flux_q", None)
    mod.__dict__.pop("_flux_cache", None)


def attach_router(model: nn.Module, config: Optional[RouterConfig] = None, *,
                  dtype: torch.dtype = torch.float32) -> List[LayerRouter]:
    """Give every attention layer of ``model`` a Layer Router and switch it to ``"flux"``.

    Args:
        model: a transformers model whose decoder layers hold ``self_attn`` modules with ``q_proj``
            (and optionally ``q_norm``), ``k_proj``, ``v_proj``, ``layer_idx`` (Llama, Mistral,
            Qwen2, Qwen3, ...).
        config: :class:`RouterConfig` shared by all routers (default ``RouterConfig()``).
        dtype: router parameter dtype (fp32 by default, whatever the model's dtype).

    Returns:
        The routers in layer order. Each is ``<attention module>.mask_allocator``, so it appears in
        ``model.state_dict()`` as ``...layers.{i}.self_attn.mask_allocator.*``. Calling it again
        replaces the routers (fresh FA-biased weights) and their hooks.
    """
    config = config if config is not None else RouterConfig()
    if not isinstance(config, RouterConfig):
        raise TypeError(f"attach_router: config must be a RouterConfig; got {type(config).__name__}")
    register()
    found = _attention_modules(model)
    detach_router(model)
    out = []
    for name, attn in found:
        weight = next(attn.q_proj.parameters(), None)
        router = LayerRouter(_head_dim(attn), config).to(
            device=weight.device if weight is not None else None, dtype=dtype)
        router.train(attn.training)  # a fresh module is in training mode; follow the model's
        setattr(attn, _ROUTER, router)
        q_source = attn.q_norm if isinstance(getattr(attn, "q_norm", None), nn.Module) else attn.q_proj
        attn._flux_hooks = [
            q_source.register_forward_hook(_capture_q(attn)),
            attn.register_forward_pre_hook(_capture_cache(attn, name), with_kwargs=True),
            attn.register_forward_hook(_release),
        ]
        out.append((attn.layer_idx, router))
    if getattr(model.config, "_attn_implementation", None) != "flux":
        model.set_attn_implementation("flux")
    return [r for _, r in sorted(out, key=lambda t: t[0])]


def detach_router(model: nn.Module) -> None:
    """Remove the routers and hooks :func:`attach_router` added (the attention implementation is
    left as it is: without routers ``"flux"`` runs full attention)."""
    for _, m in model.named_modules():
        for h in m.__dict__.pop("_flux_hooks", []):
            h.remove()
        if _ROUTER in getattr(m, "_modules", {}) and isinstance(m._modules[_ROUTER], LayerRouter):
            del m._modules[_ROUTER]
        m.__dict__.pop("_flux_route", None)


def routers(model: nn.Module) -> Dict[int, LayerRouter]:
    """``{layer_idx: router}`` of the attached routers."""
    found = {}
    for _, m in model.named_modules():
        r = getattr(m, "_modules", {}).get(_ROUTER)
        if isinstance(r, LayerRouter):
            found[m.layer_idx] = r
    return dict(sorted(found.items()))


def _routed(model: nn.Module) -> List[nn.Module]:
    mods = [m for _, m in model.named_modules() if isinstance(getattr(m, "_modules", {}).get(_ROUTER), LayerRouter)]
    if not mods:
        raise ValueError("no routers attached: call flux_attention.attach_router(model, config)")
    return sorted(mods, key=lambda m: m.layer_idx)


def set_router_temperature(model: nn.Module, tau: float) -> None:
    """Set the Gumbel temperature of every router (training; see ``RouterConfig.temperature``)."""
    if not tau > 0:
        raise ValueError(f"set_router_temperature: tau must be positive; got {tau}")
    for m in _routed(model):
        getattr(m, _ROUTER).tau = float(tau)


@dataclasses.dataclass
class RoutingReport:
    """Per-layer decisions of the last prefill: ``use_sparse[i, b]`` (True = SA) for layer
    ``layers[i]`` and sequence b; ``sa_fraction[b]`` = share of sequence b's layers on SA;
    ``learned[i]`` = the router decided (False: forced by the config)."""

    layers: List[int]
    use_sparse: Tensor
    sa_fraction: Tensor
    learned: List[bool]

    def __str__(self) -> str:
        lines = [f"layer  {'  '.join(f'seq{b}' for b in range(self.use_sparse.shape[1]))}"]
        for i, layer in enumerate(self.layers):
            cells = "  ".join(f"{'SA' if s else 'FA':>4}" for s in self.use_sparse[i].tolist())
            lines.append(f"{layer:>5}  {cells}{'' if self.learned[i] else '  (forced)'}")
        lines.append("SA frac " + "  ".join(f"{f:.2f}" for f in self.sa_fraction.tolist()))
        return "\n".join(lines)


def routing_report(model: nn.Module) -> RoutingReport:
    """The FA/SA decision of every routed layer for every sequence of the last prefill."""
    mods = _routed(model)
    missing = [m.layer_idx for m in mods if "_flux_route" not in m.__dict__]
    if missing:
        raise RuntimeError(f"routing_report: layers {missing} have not routed a prefill yet")
    flags = [m._flux_route["use_sparse"] for m in mods]
    # One device-to-host copy for all layers (one sync, not one per layer).
    use_sparse = torch.stack([f.to(flags[0].device) for f in flags]).cpu()
    return RoutingReport(
        layers=[m.layer_idx for m in mods],
        use_sparse=use_sparse,
        sa_fraction=use_sparse.float().mean(0),
        learned=[bool(m._flux_route["learned"]) for m in mods],
    )


@torch.no_grad()
def calibrate_routers(model: nn.Module, run, reduce=None) -> Dict[int, Tuple[Tensor, Tensor]]:
    """Set each router's input normalisation from the pooled queries of the inputs ``run()``
    feeds the model: ``shift`` = their mean, ``scale`` = their standard deviation per feature
    (floored at 1e-3 of the mean deviation), so the MLP starts on standardised inputs.

    Pooled queries of different prompts agree to ~99.5 % in cosine similarity (the model's mean
    query direction dominates the pooled average); unnormalised, an MLP of PyTorch's default init
    maps every prompt to nearly the same logits and learns one routing for all inputs.

    Args:
        model: a model with routers (:func:`attach_router`).
        run: a callable that runs the model on calibration inputs (several sequences in all; it
            may call the model several times). Routing decisions taken meanwhile are discarded.
        reduce: optional ``reduce(t)`` that sums a tensor over ranks in place (distributed
            training: every rank then sets the same statistics).

    Returns:
        ``{layer: (shift, scale)}`` as set; layers whose branch the RouterConfig forces (``force``,
        ``force_sparse_layers``) are left as they are and not listed.
    """
    found = routers(model)
    if not found:
        raise ValueError("calibrate_routers: the model has no routers (attach_router first)")
    # Layers whose branch the config fixes (force, force_sparse_layers) never pool: nothing to set.
    found = {i: r for i, r in found.items()
             if r.config.force is None and i not in r.config.force_sparse_layers}
    if not found:
        return {}
    stats: Dict[int, List[Tensor]] = {}

    def hook(layer):
        def grab(mod, args):
            x = args[0].detach().to(torch.float64)
            s = stats.setdefault(layer, [x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1]), x.new_zeros(())])
            s[0] += x.sum(0)
            s[1] += (x * x).sum(0)
            s[2] += x.shape[0]
        return grab

    handles = [r.register_forward_pre_hook(hook(i)) for i, r in found.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(found) - set(stats))
    if missing:
        raise RuntimeError(f"calibrate_routers: run() did not reach the routers of layers {missing} "
                           "(a forward without pre-RoPE queries to pool, e.g. a cached decode step)")
    layers = sorted(found)
    # One [layers, 2d + 1] tensor of (sum, sum of squares, count): a single reduction over ranks.
    packed = torch.stack([torch.cat([stats[i][0], stats[i][1], stats[i][2].reshape(1)]) for i in layers])
    if reduce is not None:
        reduce(packed)
    out = {}
    for layer, row in zip(layers, packed):
        router = found[layer]
        d = router.head_dim
        total, squares, count = row[:d], row[d:2 * d], row[2 * d]
        if count < 2:
            raise ValueError(f"calibrate_routers: layer {layer} saw {int(count)} sequence(s); "
                             "calibrating needs at least 2")
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt()
        scale = std.clamp_min(max(1e-3 * float(std.mean()), 1e-6))
        router.set_feature_normalization(mean.float(), scale.float())
        out[layer] = (router.feature_shift.clone(), router.feature_scale.clone())
    return out


def collect_sparsity(model: nn.Module) -> Tensor:
    """Per-sequence fraction of layers routed to SA in the last forward, ``[B]``: the ``s`` of the
    training objective. Differentiable in training mode (through the straight-through gates)."""
    mods = _routed(model)
    missing = [m.layer_idx for m in mods if "_flux_route" not in m.__dict__]
    if missing:
        raise RuntimeError(f"collect_sparsity: layers {missing} have not routed a forward yet")
    z = torch.stack([m._flux_route["z"].float() for m in mods])
    return (1 - z).mean(0)
