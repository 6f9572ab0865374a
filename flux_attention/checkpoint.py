"""Router checkpoints in safetensors: ours, and router weights saved by the reference implementation.

Both use the reference's parameter names,
``model.layers.{i}.self_attn.mask_allocator.cls_feat_extractor.{0,2}.{weight,bias}`` and
``model.layers.{i}.self_attn.mask_allocator.cls_router_head_agnostic.{0,2,4}.{weight,bias}``.
Keys are matched by layer index and the part after ``mask_allocator.``, so a checkpoint saved from
``LlamaForCausalLM`` loads into ``LlamaModel`` (no ``model.`` prefix) and the other way round.

A reference checkpoint may be a whole model (one file, or a directory of shards): everything that
is not a router parameter is ignored, and the training-only tensors it carries (the Lagrange
multipliers ``model.sparsity_lambda{1,2}_task`` and the unused router members ``log_temp``,
``task_embedding``) are skipped with a note.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
from typing import Dict, List, Optional

import torch
from torch import nn

from .router import LayerRouter, RouterConfig

__all__ = ["save_router", "load_router", "LoadResult"]

logger = logging.getLogger(__name__)

FORMAT = "flux-attention-router"
_ROUTER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.mask_allocator\.(.+)$")
_LAMBDA_KEY = re.compile(r"(?:^|\.)sparsity_lambda\d?(_task)?$")
# Members of the reference router that inference does not use (REFERENCE.md section 1.3).
_UNUSED_ROUTER_PARTS = re.compile(r"^(log_temp|tau|task_embedding(\..*)?)$")


@dataclasses.dataclass
class LoadResult:
    """What :func:`load_router` did: ``loaded`` router tensors; ``skipped`` training-only tensors
    (reference multipliers and unused router members), by name; ``ignored`` the count of other
    tensors (the base model's weights in a whole-model checkpoint); ``config`` the RouterConfig
    stored with the checkpoint, if any."""

    loaded: int
    skipped: List[str]
    ignored: int
    config: Optional[RouterConfig]

    @property
    def notes(self) -> List[str]:
        out = []
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} training-only tensor(s) not used at inference: "
                       + ", ".join(self.skipped[:6]) + (" ..." if len(self.skipped) > 6 else ""))
        if self.ignored:
            out.append(f"ignored {self.ignored} non-router tensor(s)")
        return out


def _routers(model: nn.Module) -> Dict[int, LayerRouter]:
    from .hf import routers

    return routers(model)


def save_router(model: nn.Module, path: str) -> None:
    """Save every router of ``model`` (and their RouterConfig) to the safetensors file ``path``.

    Only router parameters are written, under the names ``model.state_dict()`` gives them."""
    from safetensors.torch import save_file

    found = _routers(model)
    if not found:
        raise ValueError("save_router: the model has no routers (attach_router first)")
    tensors = {name: t.detach().contiguous().cpu()
               for name, t in model.state_dict().items() if _ROUTER_KEY.search(name)}
    config = next(iter(found.values())).config
    save_file(tensors, path, metadata={"format": FORMAT, "router_config": json.dumps(config.to_dict())})


def _files(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"load_router: no *.safetensors file in directory {path}")
        return files
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_router: {path} does not exist")
    return [path]


def load_router(model: nn.Module, path: str, *, config: Optional[RouterConfig] = None,
                strict: bool = True) -> LoadResult:
    """Load router weights into ``model`` from a safetensors file or a directory of shards.

    Args:
        model: a transformers model. Without routers, :func:`~flux_attention.attach_router` is
            called first with ``config``, else the config stored in the checkpoint, else the
            default ``RouterConfig()``.
        path: our :func:`save_router` file, or a reference checkpoint (router weights alone or a
            whole model).
        config: RouterConfig for routers attached here (ignored when the model has routers).
        strict: every router of the model must be fully loaded, and no router tensor of the
            checkpoint may be left unused (a layer the model lacks, an unknown name).

    Returns:
        A :class:`LoadResult`; its ``notes`` are also logged.
    """
    from safetensors import safe_open

    files = _files(path)
    stored_config = None
    picked: Dict[int, Dict[str, torch.Tensor]] = {}
    skipped: List[str] = []
    ignored = 0
    for f in files:
        with safe_open(f, framework="pt") as st:
            meta = st.metadata() or {}
            if meta.get("format") == FORMAT and "router_config" in meta:
                stored_config = RouterConfig.from_dict(json.loads(meta["router_config"]))
            for name in st.keys():
                m = _ROUTER_KEY.search(name)
                if m is None:
                    if _LAMBDA_KEY.search(name):
                        skipped.append(name)
                    else:
                        ignored += 1
                    continue
                layer, part = int(m.group(1)), m.group(2)
                if _UNUSED_ROUTER_PARTS.match(part):
                    skipped.append(name)
                    continue
                picked.setdefault(layer, {})[part] = st.get_tensor(name)

    found = _routers(model)
    if not found:
        from .hf import attach_router

        attach_router(model, config if config is not None else (stored_config or RouterConfig()))
        found = _routers(model)

    problems = []
    loaded = 0
    for layer, parts in sorted(picked.items()):
        router = found.get(layer)
        if router is None:
            problems.append(f"checkpoint has router weights for layer {layer}, the model has no "
                            f"routed layer {layer} (routed: {sorted(found)})")
            continue
        # Parameters and the input normalisation buffers (absent from reference checkpoints:
        # they then stay the identity).
        own = {**dict(router.named_parameters()), **dict(router.named_buffers())}
        for part, tensor in sorted(parts.items()):
            if part not in own:
                problems.append(f"layer {layer}: unknown router tensor '{part}'")
                continue
            if tuple(tensor.shape) != tuple(own[part].shape):
                raise ValueError(
                    f"load_router: layer {layer} '{part}' has shape {tuple(tensor.shape)} in the "
                    f"checkpoint and {tuple(own[part].shape)} in the model (head_dim differs?)")
            with torch.no_grad():
                own[part].copy_(tensor.to(dtype=own[part].dtype, device=own[part].device))
            loaded += 1
    for layer, router in found.items():
        if layer in picked and "feature_shift" not in picked[layer]:
            # A checkpoint without input normalisation (the reference's) was trained on raw pooled
            # queries: whatever an earlier calibration left in the buffers must not apply to it.
            with torch.no_grad():
                router.feature_shift.zero_()
                router.feature_scale.fill_(1.0)
        names = {n for n, _ in router.named_parameters()}
        missing = sorted(names - set(picked.get(layer, {})))
        if missing:
            problems.append(f"layer {layer}: missing {', '.join(missing)}")
    if problems and strict:
        raise ValueError("load_router: " + "; ".join(problems[:8])
                         + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))
    for p in problems:
        logger.warning("load_router: %s", p)
    result = LoadResult(loaded=loaded, skipped=skipped, ignored=ignored, config=stored_config)
    for note in result.notes:
        logger.info("load_router: %s", note)
    return result
