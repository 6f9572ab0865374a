"""A greedy decode loop with static shapes, driven outside ``generate``.

``model.generate`` reads the new tokens on the host after every step (stopping criteria), which
serialises host and device, and its Python work per step is comparable to a whole step of device
work on a fast GPU. :class:`StaticDecodeLoop` keeps the next input ids and positions in device
buffers, runs one forward per token with ``logits_to_keep=1``, feeds the argmax back on the device
and never reads a device value on the host. With ``cuda_graph=True`` (CUDA and a
:class:`~flux_attention.cache.FluxCache`) one step is captured once and replayed per token, so
the per-layer Python and launch work of the model disappears from the step time.

Why the replay is exact: a FluxCache decode step only updates device tensors in place
(``cache_seqlens``, the write slots; see ``flux_attention.cache``) once its pages are reserved
(``FluxCache.reserve``), and the loop's own inputs live in the same static buffers every step.
What the replays skip is host bookkeeping (token counters), which the loop hands to the cache
(``FluxCache.advance_host``).

>>> out = model(prompt_ids, past_key_values=cache, logits_to_keep=1)    # prefill
>>> loop = StaticDecodeLoop(model, cache, cuda_graph=True)
>>> loop.start(out.logits[:, -1].argmax(-1), positions=prompt_len, max_steps=256)
>>> new_tokens = loop.step(255)                                             # [B, 255]

Limits: greedy only; every sequence advances by one token per step; no attention mask is passed,
so with a cache other than FluxCache (which stores sequences unpadded) the batch must be unpadded.
"""

from __future__ import annotations

import inspect
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .cache import FluxCache

__all__ = ["StaticDecodeLoop"]


def _cache_keyword(model: nn.Module) -> str:
    """The forward keyword for the cache: ``cache`` in newer transformers, ``past_key_values``
    before (both accepted by 5.2x, the old one with a deprecation warning)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class StaticDecodeLoop:
    """Greedy decoding, one token per sequence per step, no host synchronisation.

    Args:
        model: a causal LM (transformers), in eval mode.
        cache: the prefilled cache of the batch (FluxCache, or a dynamic transformers cache when
            ``cuda_graph`` is False).
        cuda_graph: capture one step in a CUDA graph and replay it (CUDA, FluxCache only).
        warmup_steps: eager steps run before the capture (lazy initialisation of kernels and
            libraries must not happen inside it). They are real decode steps.
    """

    def __init__(self, model: nn.Module, cache, *, cuda_graph: bool = False, warmup_steps: int = 2):
        if model.training:
            raise ValueError("StaticDecodeLoop: call model.eval() first")
        if cuda_graph and not isinstance(cache, FluxCache):
            raise ValueError(f"StaticDecodeLoop: cuda_graph needs a FluxCache (a "
                             f"{type(cache).__name__} grows its tensors every step)")
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"StaticDecodeLoop: warmup_steps must be a positive int; got {warmup_steps!r}")
        self.model = model
        self.cache = cache
        self.cuda_graph = cuda_graph
        self.warmup_steps = warmup_steps
        self._kw = {_cache_keyword(model): cache, "use_cache": True, "logits_to_keep": 1}
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self.ids: Optional[Tensor] = None  # [B, 1] int64: the token each sequence feeds next
        self.positions: Optional[Tensor] = None  # [B, 1] int64: its position
        self._tokens: Optional[Tensor] = None
        self._done = 0
        self._limit = 0

    @property
    def tokens(self) -> Tensor:
        """``[B, n]``: every token this loop generated so far (warmup steps included)."""
        return self._tokens[:, :self._done]

    @property
    def steps_left(self) -> int:
        return self._limit - self._done

    def start(self, input_ids: Tensor, positions: Union[Tensor, int], max_steps: int) -> None:
        """Set the first inputs and prepare ``max_steps`` steps.

        Args:
            input_ids: ``[B]`` or ``[B, 1]`` int64: the token each sequence feeds first (e.g. the
                argmax of the prefill's last logits).
            positions: ``[B]`` / ``[B, 1]`` int64 or an int: the position of that token (the
                number of tokens of the sequence before it).
            max_steps: steps this loop may run (pages for them are reserved in a FluxCache). With
                ``cuda_graph``, ``warmup_steps`` eager steps and one replay run here and count.
        """
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"StaticDecodeLoop.start: max_steps must be a positive int; got {max_steps!r}")
        if self.cuda_graph and max_steps < self.warmup_steps + 1:
            raise ValueError(f"StaticDecodeLoop.start: with cuda_graph, max_steps ({max_steps}) must "
                             f"cover the {self.warmup_steps} warmup steps and the captured one")
        if not isinstance(input_ids, Tensor) or input_ids.dtype != torch.int64 or input_ids.dim() not in (1, 2):
            raise ValueError("StaticDecodeLoop.start: input_ids must be an int64 tensor [B] or [B, 1]")
        ids = input_ids.reshape(-1, 1)
        batch = ids.shape[0]
        if isinstance(positions, int):
            positions = torch.full((batch, 1), positions, dtype=torch.int64, device=ids.device)
        if positions.dtype != torch.int64 or positions.numel() != batch:
            raise ValueError(f"StaticDecodeLoop.start: positions must be an int or int64 [B] ({batch}); "
                             f"got {positions.dtype} {tuple(positions.shape)}")
        self.close()
        self.ids = ids.clone()
        self.positions = positions.reshape(-1, 1).to(ids.device).clone()
        self._tokens = torch.empty(batch, max_steps, dtype=torch.int64, device=ids.device)
        self._done, self._limit = 0, max_steps
        if isinstance(self.cache, FluxCache):
            self.cache.reserve(max_steps)
        if self.cuda_graph:
            self._capture()

    @torch.no_grad()
    def _forward(self) -> None:
        out = self.model(input_ids=self.ids, position_ids=self.positions, **self._kw)
        self.ids.copy_(out.logits[:, -1].argmax(-1, keepdim=True))
        self.positions.add_(1)

    def _log(self) -> None:
        self._tokens[:, self._done].copy_(self.ids[:, 0])
        self._done += 1

    def _capture(self) -> None:
        device = self.ids.device
        if device.type != "cuda":
            raise ValueError(f"StaticDecodeLoop: cuda_graph needs CUDA tensors; got {device}")
        # Warm up on a side stream, as torch.cuda.graphs recommends: library handles, lazy kernel
        # loading and allocator blocks come into being outside the capture.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                self._forward()
                self._log()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._forward()  # runs the host side of one step; the device side is recorded
        self._graph = graph
        graph.replay()  # the device side of that step: host and device agree again
        self._log()

    def step(self, n: int) -> Tensor:
        """Run ``n`` greedy steps; returns their tokens ``[B, n]`` (device). No host sync."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"StaticDecodeLoop.step: n must be a non-negative int; got {n!r}")
        if self.ids is None:
            raise RuntimeError("StaticDecodeLoop.step: call start() first")
        if n > self.steps_left:
            raise ValueError(f"StaticDecodeLoop.step: {n} steps requested, {self.steps_left} left "
                             "of max_steps; call start() again")
        first = self._done
        if self._graph is not None:
            self.cache.advance_host(n)
            for _ in range(n):
                self._graph.replay()
                self._log()
        else:
            for _ in range(n):
                self._forward()
                self._log()
        return self._tokens[:, first:self._done]

    def close(self) -> None:
        """Drop the captured graph (and the memory its private pool holds)."""
        self._graph = None
