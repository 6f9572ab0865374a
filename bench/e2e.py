"""End-to-end speed through transformers: a Llama-3.1-8B-shaped model on one GPU, prefill and decode,
Hugging Face's default attention against flux attention with forced routing.

Model: LlamaForCausalLM built from a config on the device (hidden 4096, 32 layers, 32 q heads, 8 kv
heads, intermediate 14336, vocab 128256; random weights, bf16; no download). Configurations:

- ``sdpa``: ``attn_implementation="sdpa"`` with its DynamicCache (transformers' default), the anchor;
- ``flux_fa``: flux attention, every layer full attention (FA), FluxCache;
- ``flux_saNN``: flux attention with NN % of the layers forced to sparse attention (SA: sink 128 +
  16 local blocks of 128), evenly spaced (``RouterConfig(force="fa", force_sparse_layers=...)``);
- with ``--fused-ops``: the flux configurations also run transformers' RMSNorm, SiLU * up,
  rotary embedding and, at decode, the linear layers through ``flux_attention.fuse_ops``
  (``--no-decode-linears`` leaves the linears to cuBLAS), and ``sdpa_fused`` (sdpa with the same
  fused ops) joins as a second anchor, so that the table separates what routing gains from what the
  fused ops gain. Speedups stay against plain ``sdpa``.

Measured per context length (8K, 32K, 64K, 128K; one random prompt, batch 1):

- prefill: one forward with ``logits_to_keep=1`` into a fresh cache (ms; repeated where cheap);
- decode from that context: greedy steps through ``flux_attention.StaticDecodeLoop`` (static
  shapes, no host sync; the same loop drives sdpa), eager and, for flux, replaying a CUDA graph of
  the step; at batch 1, 4 and the largest batch that fits. Batches > 1 decode copies of the
  prefilled sequence (``cache.batch_select_indices``): the same cache bytes and decode work as
  distinct prompts, without one 128K prefill per sequence;
- the largest batch that fits: sequences prefilled one at a time (a batched 128K prefill needs
  ~30 GB of activations per sequence in any attention), so it is the largest B whose B - 1 caches
  leave room for one more prefill (its peak measured at batch 1), confirmed by decoding at B;
- the computed floor of each measurement and the fraction of it reached (bench/e2e_floor.py);
- KV memory per sequence; the router's cost per layer at the longest context.

Everything is ordered by what the acceptance of issue 10 needs first and runs under a time budget
(default 320 s from process start, model construction included); what does not fit is listed as
skipped. Each step catches and reports its own failure and the run continues. Writes
``bench/results/<name>.json``, also into ``--out-dir`` (default ``$OUT``), and ``<name>.png``
(speedup against context) into ``--out-dir`` (``runs/e2e/`` without one), and prints a summary
table and the acceptance checks at the end.

    python bench/e2e.py [--quick] [--tiny] [--fused-ops] [--budget-s S] [--no-cuda-graph] [--out-dir DIR]

``--tiny`` runs the same pipeline on a tiny Llama config (CPU by default, fp32) for tests and CI.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the budget counts from here: imports and model construction included

import argparse  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import print_table, write_results  # noqa: E402
from bench.e2e_floor import (  # noqa: E402
    ModelShape,
    Pattern,
    decode_step_bytes,
    measure_copy,
    measure_linear,
    prefill_floor_ms,
)

import flux_attention as fa  # noqa: E402
from flux_attention import hf  # noqa: E402
from flux_attention.decode_loop import StaticDecodeLoop, _cache_keyword  # noqa: E402
from flux_attention.router import spread_layers  # noqa: E402

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=132096,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=8192, tie_word_embeddings=False)
PATTERN = dict(sink_tokens=128, local_blocks=16, block_size=128)
TINY_PATTERN = dict(sink_tokens=16, local_blocks=2, block_size=16)

SA_FRACTION = {"flux_fa": 0.0, "flux_sa25": 0.25, "flux_sa50": 0.5, "flux_sa75": 0.75,
               "flux_sa90": 0.9, "flux_sa100": 1.0}
CONFIGS = ["sdpa", "sdpa_fused"] + list(SA_FRACTION)
ACCEPTANCE_CONFIGS = ["sdpa", "flux_fa", "flux_sa75", "flux_sa90", "flux_sa100"]
LARGEST_CONFIGS = ["sdpa", "flux_sa75"]
K = 1024
WARM_STEPS = 2  # eager decode steps before timing (a graph loop warms up inside start())
RESERVE_S = 12.0  # budget kept for the summary, JSON and plot
GiB = 1 << 30


def is_sdpa(config: str) -> bool:
    return config.startswith("sdpa")


def ctx(length: int) -> str:
    return f"{length // K}K" if length >= K and length % K == 0 else str(length)


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed_ms(fn, device: torch.device) -> float:
    """Wall milliseconds of ``fn()`` including its device work."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t) * 1e3


def cache_bytes(cache) -> int:
    """Bytes of K/V storage the cache holds (FluxCache: its page pools, free pages included)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("k_pages", "v_pages", "keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class Budget:
    def __init__(self, seconds: float):
        self.deadline = T0 + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, estimate_s: float) -> bool:
        return estimate_s <= self.left() - RESERVE_S


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.float32 if (args.tiny and self.device.type == "cpu") else torch.bfloat16
        self.budget = Budget(args.budget_s)
        self.pattern = dict(TINY_PATTERN if args.tiny else PATTERN)
        self.prefill: Dict[tuple, dict] = {}
        self.decode: Dict[tuple, dict] = {}
        self.largest: Dict[tuple, dict] = {}
        self.router: Optional[dict] = None
        self.errors: List[dict] = []
        self.skipped: List[dict] = []
        self.rates: Dict[str, object] = {}
        self.current = None
        self.model = None
        self.graph_error: Optional[str] = None  # set when a CUDA graph capture failed

    # -- plumbing ---------------------------------------------------------------------------------

    def guarded(self, what: str, fn, *a, **kw):
        """Runs one step; a failure is recorded (out of memory included) and the run goes on."""
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
            oom = isinstance(e, torch.cuda.OutOfMemoryError)
            msg = "out of memory" if oom else f"{type(e).__name__}: {e}"
            self.errors.append({"task": what, "error": msg[:2000],
                                "traceback": "" if oom else traceback.format_exc()[-3000:]})
            log(f"FAILED {what}: {msg[:300]}")
            free_memory()
            return None

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append({"task": what, "reason": reason})
        log(f"skip {what}: {reason}")

    # -- model and configurations -------------------------------------------------------------------

    def build(self) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        spec = dict(TINY if self.args.tiny else LLAMA_8B)
        if self.args.tiny and self.device.type == "cuda":
            spec.update(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)  # head_dim 64
        config = LlamaConfig(**spec, pad_token_id=0, attn_implementation="sdpa")
        torch.manual_seed(0)
        with torch.device(self.device):
            model = LlamaForCausalLM._from_config(config, dtype=self.dtype)
        model.eval()
        with torch.no_grad():  # random weights of a sane scale, whatever the init did
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0)
                elif not torch.isfinite(p).all():
                    p.normal_(0.0, 0.02)
        self.model = model
        self.shape = ModelShape.of(model.config, torch.finfo(self.dtype).bits // 8)
        self.pattern_t = Pattern(**self.pattern)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.cache_kw = _cache_keyword(model)
        log(f"model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
            f"{self.dtype}, {self.device}, cache keyword '{self.cache_kw}'")

    def sa_layers(self, config: str) -> List[int]:
        return [] if is_sdpa(config) else sorted(spread_layers(self.shape.layers, SA_FRACTION[config]))

    def use(self, config: str) -> None:
        if self.current == config:
            return
        hf.detach_router(self.model)
        fa.unfuse_ops(self.model)
        if is_sdpa(config):
            self.model.set_attn_implementation("sdpa")
        else:
            fa.attach_router(self.model, fa.RouterConfig(
                force="fa", force_sparse_layers=self.sa_layers(config), **self.pattern))
            self.model.eval()
        if config == "sdpa_fused" or (self.args.fused_ops and not is_sdpa(config)):
            fa.fuse_ops(self.model, decode_linears=self.args.decode_linears)
        self.current = config

    def new_cache(self, config: str, reserve: int):
        if is_sdpa(config):
            from transformers import DynamicCache

            return DynamicCache(config=self.model.config)
        cache = fa.FluxCache(self.model.config)
        cache.reserve(reserve)  # the prefill sizes the pools for the decode steps to come
        return cache

    # -- ceilings and floors ------------------------------------------------------------------------

    def measure_rates(self) -> None:
        tokens = 256 if self.args.tiny else 8192
        self.rates["linear"] = measure_linear(self.shape, self.device, self.dtype, tokens)
        self.rates["copy"] = measure_copy(self.device, (64 << 20) if self.args.tiny else (2 * GiB))
        self.rates["attn_tflops_assumed"] = self.args.attn_tflops
        log(f"ceilings: linear layers {self.rates['linear']['tflops']:.0f} TFLOP/s "
            f"({self.rates['linear']['ms_per_token'] * 1e3:.2f} us/token), copy "
            f"{self.rates['copy']['tb_s']:.2f} TB/s; attention assumed {self.args.attn_tflops:.0f} TFLOP/s")

    def prefill_floor(self, config: str, length: int) -> dict:
        return prefill_floor_ms(length, len(self.sa_layers(config)), self.shape,
                                self.rates["linear"]["ms_per_token"], self.pattern_t, self.args.attn_tflops)

    def decode_floor_ms(self, config: str, context: int, batch: int) -> float:
        b = decode_step_bytes(context, batch, len(self.sa_layers(config)), self.shape, self.pattern_t)
        return b["total"] / (self.rates["copy"]["tb_s"] * 1e12) * 1e3

    # -- estimates for the budget -------------------------------------------------------------------

    def estimate_prefill_s(self, config: str, length: int) -> float:
        floor = self.prefill_floor(config, length)["floor_ms"]
        done = sorted((L, r) for (c, L), r in self.prefill.items() if c == config)
        if done:
            L0, r = min(done, key=lambda t: abs(math.log(t[0] / length)))
            return 1.25 * r["ms"] * floor / self.prefill_floor(config, L0)["floor_ms"] / 1e3
        ref = [r for (c, L), r in self.prefill.items() if c == "sdpa" and L == length]
        if ref:
            return 1.25 * ref[0]["ms"] / 1e3
        return 4.0 * floor / 1e3 + 1.0

    def estimate_step_s(self, config: str, length: int, batch: int) -> float:
        floor = self.decode_floor_ms(config, length, batch)
        done = [(k, r) for k, r in self.decode.items() if k[0] == config]
        if done:
            k, r = min(done, key=lambda t: abs(math.log(t[0][1] / length)) + abs(math.log(t[0][2] / batch)))
            return 1.5 * r["ms_per_step"] * floor / self.decode_floor_ms(config, k[1], k[2]) / 1e3
        return (10.0 * floor + 30.0) / 1e3

    def modes(self, config: str) -> List[str]:
        graph = (self.args.cuda_graph and self.device.type == "cuda" and not is_sdpa(config)
                 and self.graph_error is None)
        return ["eager", "graph"] if graph else ["eager"]

    def estimate_decode_s(self, config: str, length: int, batch: int) -> float:
        steps = self.args.decode_steps + WARM_STEPS + 1
        return len(self.modes(config)) * steps * self.estimate_step_s(config, length, batch) + 0.5

    # -- measurements -------------------------------------------------------------------------------

    def warm_attention(self, config: str, length: int) -> None:
        """One attention call at this length outside the model, so one-time work tied to a new shape
        (cuDNN plans, workspaces) stays out of a prefill timed once."""
        d, hq, hkv = self.shape.head_dim, self.shape.heads_q, self.shape.heads_kv
        q = torch.randn(length, hq, d, device=self.device, dtype=self.dtype)
        k = torch.randn(length, hkv, d, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            if is_sdpa(config):  # the layout transformers hands SDPA: [1, H, S, D]
                qs = torch.randn(1, hq, length, d, device=self.device, dtype=self.dtype)
                ks = torch.randn(1, hkv, length, d, device=self.device, dtype=self.dtype)
                torch.nn.functional.scaled_dot_product_attention(qs, ks, ks, is_causal=True, enable_gqa=True)
            else:
                cu = torch.tensor([0, length], dtype=torch.int32, device=self.device)
                n_sa = len(self.sa_layers(config))
                for sparse in {n_sa > 0, n_sa < self.shape.layers}:
                    fa.flux_attention(q, k, k, torch.tensor([sparse], device=self.device),
                                      cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=length,
                                      max_seqlen_k=length, **self.pattern)
        sync(self.device)

    def run_prefill(self, config: str, length: int, reserve: int):
        """(cache, next token [1], record) of one timed prefill."""
        ids = torch.randint(3, self.shape.vocab, (1, length), device=self.device)
        cache = self.new_cache(config, reserve)
        free_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        out = {}

        def go():
            with torch.no_grad():
                logits = self.model(input_ids=ids, use_cache=True, logits_to_keep=1,
                                    **{self.cache_kw: cache}).logits
            out["next"] = logits[:, -1].argmax(-1)

        ms = elapsed_ms(go, self.device)
        mem = {"cache_bytes": cache_bytes(cache)}
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            mem.update(before=before, after=torch.cuda.memory_allocated(self.device),
                       peak=torch.cuda.max_memory_allocated(self.device),
                       usable=free + torch.cuda.memory_reserved(self.device), total=total)
        return cache, out["next"], ms, mem

    def run_decode(self, config: str, cache, ids, pos, mode: str, steps: int):
        """ms per step of ``steps`` greedy steps; returns (ms, next ids, next positions)."""
        loop = StaticDecodeLoop(self.model, cache, cuda_graph=(mode == "graph"), warmup_steps=WARM_STEPS)
        try:
            loop.start(ids, pos, steps + WARM_STEPS + (1 if mode == "graph" else 0))
            if mode == "eager":
                loop.step(WARM_STEPS)
            ms = elapsed_ms(lambda: loop.step(steps), self.device) / steps
            return ms, loop.ids.clone(), loop.positions.clone()
        finally:
            loop.close()

    def record_decode(self, config: str, length: int, batch: int, mode: str, ms: float, cache) -> dict:
        floor = self.decode_floor_ms(config, length, batch)
        rec = {"config": config, "length": length, "batch": batch, "mode": mode, "ms_per_step": ms,
               "tokens_per_s": batch * 1e3 / ms, "floor_ms": floor, "fraction_of_floor": floor / ms,
               "cache_bytes": cache_bytes(cache)}
        self.decode[(config, length, batch, mode)] = rec
        log(f"decode {config} {ctx(length)} B={batch} {mode}: {ms:.2f} ms/step "
            f"({rec['tokens_per_s']:.1f} tok/s, floor {floor:.2f} ms, {100 * floor / ms:.0f} %)")
        return rec

    def context(self, config: str, length: int, batches: List[int], largest: bool, reps: int) -> None:
        """Prefill at ``length`` (``reps`` times), then decode from it at each batch (and at the
        largest batch that fits)."""
        name = f"{config} {ctx(length)}"
        est = reps * self.estimate_prefill_s(config, length) + sum(
            self.estimate_decode_s(config, length, b) for b in batches)
        if not self.budget.allows(est):
            self.skip(name, f"needs ~{est:.0f} s, {self.budget.left() - RESERVE_S:.0f} s left")
            return
        log(f"{name}: prefill x{reps}, decode at {batches}{' + largest batch' if largest else ''} (~{est:.0f} s)")
        self.use(config)
        self.guarded(f"{name} attention warmup", self.warm_attention, config, length)
        reserve = 16 + (len(batches) + 2 * int(largest)) * 2 * (self.args.decode_steps + WARM_STEPS + 1)
        samples, cache, ids, mem = [], None, None, None
        for r in range(reps):
            cache = None
            free_memory()
            got = self.guarded(f"{name} prefill", self.run_prefill, config, length, reserve)
            if got is None:
                break
            cache, ids, ms, mem = got
            samples.append(ms)
        if cache is None:
            return
        prev = self.prefill.get((config, length))
        if prev:  # a later job added samples (the first rep of a shape pays one-time costs)
            samples = prev["samples"] + samples
        warm = samples[1:] if len(samples) >= 3 else samples
        floor = self.prefill_floor(config, length)
        rec = {"config": config, "length": length, "ms": statistics.median(warm), "samples": samples,
               **floor, "fraction_of_floor": floor["floor_ms"] / statistics.median(warm),
               "sa_layers": len(self.sa_layers(config)), "memory": mem,
               "kv_bytes_per_sequence": mem["cache_bytes"]}
        self.prefill[(config, length)] = rec
        log(f"prefill {name}: {rec['ms']:.1f} ms (floor {floor['floor_ms']:.1f}, "
            f"{100 * rec['fraction_of_floor']:.0f} %), KV {mem['cache_bytes'] / 1e6:.1f} MB")

        pos = length
        batch = 1
        broken = False
        for b in batches:
            if not self.budget.allows(self.estimate_decode_s(config, length, b)):
                self.skip(f"{name} decode B={b}", "budget")
                continue
            if b != batch:
                if not self.guarded(f"{name} replicate to B={b}", _replicate, cache, b, self.device):
                    break
                ids, pos, batch = _rows(ids, b), _rows(pos, b), b
            for mode in self.modes(config):
                got = self.guarded(f"{name} decode B={b} {mode}", self.run_decode, config, cache, ids,
                                   pos, mode, self.args.decode_steps)
                if got is None:
                    # A step that failed half-way leaves the cache unusable; a failed capture also
                    # means no graph mode for the rest of the run.
                    if mode == "graph":
                        self.graph_error = self.errors[-1]["error"] if self.errors else "failed"
                    broken = True
                    break
                ms, ids, pos = got
                self.record_decode(config, length, b, mode, ms, cache)
            if broken:
                break
        if largest and broken:
            cache = None  # unusable after a failed step: the search starts from a fresh prefill
            free_memory()
            got = self.guarded(f"{name} prefill", self.run_prefill, config, length, reserve)
            if got is not None:
                cache, ids, _, mem = got
                pos = length
        if largest and cache is not None:
            self.guarded(f"{name} largest batch", self.largest_batch, config, length, cache, ids, pos,
                         mem, reserve)
        del cache
        free_memory()

    def largest_batch(self, config: str, length: int, cache, ids, pos, mem: dict, reserve: int) -> None:
        """The largest batch that prefills (one sequence at a time) and decodes at ``length``."""
        name = f"{config} {ctx(length)}"
        per_seq = mem["cache_bytes"]
        rec = {"config": config, "length": length, "kv_bytes_per_sequence": per_seq,
               "method": "prefill one sequence at a time: B - 1 caches + one prefill peak must fit; "
                         "decode confirmed at B on copies of the prefilled sequence"}
        if self.device.type != "cuda":
            fit = self.args.cpu_largest_batch
            rec["note"] = f"CPU: no device memory limit, capped at {fit}"
        else:
            transient = mem["peak"] - mem["after"]  # prefill activations beyond what stays resident
            base = mem["after"] - per_seq  # weights, routers, logits
            margin = GiB  # allocator rounding and fragmentation
            fit = int((mem["usable"] - margin - base - transient) // per_seq)
            rec.update(prefill_transient_bytes=transient, resident_base_bytes=base,
                       usable_bytes=mem["usable"], margin_bytes=margin, prefill_fit=fit)
        mode = self.modes(config)[-1]
        attempts = []
        while fit >= 1 and len(attempts) < 3:
            est = 2 * self.estimate_decode_s(config, length, fit) / len(self.modes(config))
            if not self.budget.allows(est):
                self.skip(f"{name} largest batch B={fit}", "budget")
                break
            try:
                _replicate(cache, fit, self.device)
                ms, _, _ = self.run_decode(config, cache, _rows(ids, fit), _rows(pos, fit), mode,
                                           self.args.decode_steps)
            except Exception as e:  # noqa: BLE001 - out of memory, possibly seen through a failed capture
                oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
                what = "out of memory" if oom else f"{type(e).__name__}: {e}"[:300]
                attempts.append({"batch": fit, "mode": mode, "result": what})
                log(f"largest batch {name}: B={fit} {mode}: {what}")
                cache = None
                free_memory()
                if oom:
                    fit = fit - max(1, fit // 10)
                elif mode == "graph":
                    mode = "eager"  # the same batch again without the graph
                else:
                    break
                # The cache may be half-converted or mid-step: start again from a fresh prefill.
                if fit >= 1 and self.budget.allows(self.estimate_prefill_s(config, length)):
                    try:
                        cache, ids, _, _ = self.run_prefill(config, length, reserve)
                    except torch.cuda.OutOfMemoryError:
                        # Seen once (sdpa, 8K, after an eager decode at B=121 ran out): memory the
                        # failed step held was not back yet. The search ends without a result
                        # instead of failing the whole context.
                        attempts.append({"batch": fit, "mode": mode, "result": "out of memory in the re-prefill"})
                        log(f"largest batch {name}: the re-prefill for B={fit} ran out of memory; search ends")
                        free_memory()
                        break
                    pos = length
                    continue
                break
            attempts.append({"batch": fit, "mode": mode, "result": "ok"})
            rec.update(largest=fit, ms_per_step=ms, tokens_per_s=fit * 1e3 / ms, mode=mode,
                       floor_ms=self.decode_floor_ms(config, length, fit))
            rec["fraction_of_floor"] = rec["floor_ms"] / ms
            self.record_decode(config, length, fit, mode, ms, cache)
            break
        rec["attempts"] = attempts
        self.largest[(config, length)] = rec
        if "largest" in rec:
            log(f"largest batch {name}: {rec['largest']} ({rec['tokens_per_s']:.0f} tok/s, {mode})")

    def router_overhead(self, length: int) -> None:
        """Per layer: pool_queries over the pre-RoPE queries + the router MLP + the decision, at
        ``length`` tokens, batch 1. Eager time (CUDA events around the launches) and, on CUDA, a
        CUDA graph replay: the GPU time the router adds to a prefill, whose launches overlap the
        previous layer's work (a prefill layer takes far longer than the router's launches)."""
        cfg = fa.RouterConfig(**self.pattern)
        router = fa.LayerRouter(self.shape.head_dim, cfg).to(self.device).eval()
        q = torch.randn(1, length, self.shape.heads_q, self.shape.head_dim, device=self.device,
                        dtype=self.dtype)

        def decide():
            with torch.no_grad():
                return router.gate(router(router.pool(q))) < 0.5

        reps = 50
        decide()
        eager = sorted(elapsed_ms(decide, self.device) for _ in range(reps))
        rec = {"length": length, "eager_ms": eager[reps // 2], "pool_size": cfg.pool_size,
               "router_dtype": "float32"}
        if self.device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                decide()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                decide()
            n = 100
            ms = elapsed_ms(lambda: [g.replay() for _ in range(n)], self.device) / n
            rec["graph_ms"] = ms
        self.router = rec
        log(f"router overhead at {ctx(length)}: eager {rec['eager_ms']:.4f} ms/layer"
            + (f", graph {rec['graph_ms']:.4f} ms/layer" if "graph_ms" in rec else ""))

    # -- the plan -----------------------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        lengths = sorted(args.lengths)
        configs = [c for c in CONFIGS if c in args.configs]
        longest, shortest = lengths[-1], lengths[0]
        batches = sorted(set(args.batches))
        want_largest = not args.no_largest
        # 1. every configuration at the shortest length, 3 prefills (the first pays one-time costs)
        for c in configs:
            self.context(c, shortest, batches, largest=False, reps=3)
        # 2. the acceptance points at the longest length
        first = [c for c in ACCEPTANCE_CONFIGS if c in configs]
        for c in first:
            self.context(c, longest, batches, largest=want_largest and c in LARGEST_CONFIGS, reps=1)
        if self.budget.allows(2.0):
            self.guarded("router overhead", self.router_overhead, longest)
        # 3. the other configurations at the longest length
        for c in configs:
            if c not in first:
                self.context(c, longest, batches, largest=False, reps=1)
        # 4. the lengths in between, longest first
        for L in reversed(lengths[1:-1]):
            for c in configs:
                self.context(c, L, batches, largest=False, reps=1 if L >= 64 * K else 2)
        # 5. the largest batch everywhere else, as time allows
        if want_largest:
            for L in reversed(lengths):
                for c in configs:
                    if (c, L) not in self.largest and (L != longest or c not in LARGEST_CONFIGS):
                        self.context(c, L, [], largest=True, reps=1)

    # -- results --------------------------------------------------------------------------------------

    def speedups(self) -> None:
        for (c, L), r in self.prefill.items():
            base, fused = self.prefill.get(("sdpa", L)), self.prefill.get(("sdpa_fused", L))
            r["speedup_vs_sdpa"] = base["ms"] / r["ms"] if base else None
            r["speedup_vs_sdpa_fused"] = fused["ms"] / r["ms"] if fused else None
            r["floor_speedup_vs_sdpa"] = base["ms"] / r["floor_ms"] if base else None
        for (c, L, B, mode), r in self.decode.items():
            base = self.decode.get(("sdpa", L, B, "eager"))
            r["speedup_vs_sdpa"] = base["ms_per_step"] / r["ms_per_step"] if base else None

    def best_decode(self, config: str, length: int, batch: int) -> Optional[dict]:
        recs = [self.decode.get((config, length, batch, m)) for m in ("graph", "eager")]
        recs = [r for r in recs if r]
        return min(recs, key=lambda r: r["ms_per_step"]) if recs else None

    def acceptance(self) -> List[dict]:
        L = max(self.args.lengths)
        out = []

        def check(name, value, target, detail=""):
            out.append({"criterion": name, "value": value, "target": target,
                        "pass": None if value is None else bool(value >= target), "detail": detail})

        def prefill_x(c, length=L):
            r = self.prefill.get((c, length))
            return r.get("speedup_vs_sdpa") if r else None

        for c, target in (("flux_sa75", 2.2), ("flux_sa90", 2.8), ("flux_sa100", 3.3)):
            check(f"prefill {ctx(L)} {c} vs sdpa", prefill_x(c), target)
        for length in sorted(self.args.lengths):
            check(f"prefill {ctx(length)} flux_fa vs sdpa (no slower)", prefill_x("flux_fa", length), 1.0)
        base = self.decode.get(("sdpa", L, 1, "eager"))
        for c in ("flux_fa", "flux_sa75"):
            best = self.best_decode(c, L, 1)
            value = base["ms_per_step"] / best["ms_per_step"] if (base and best) else None
            check(f"decode {ctx(L)} B=1 {c} vs sdpa (tokens/s)", value, 3.0,
                  best["mode"] if best else "")
        a, b = self.best_decode("flux_sa75", L, 4), self.best_decode("flux_fa", L, 4)
        same = self.decode.get(("flux_fa", L, 4, a["mode"])) if a else None
        check(f"decode {ctx(L)} B=4 flux_sa75 vs flux_fa (tokens/s)",
              same["ms_per_step"] / a["ms_per_step"] if (a and same) else None, 2.2,
              f"both {a['mode']}" if (a and same) else "")
        if a and b:
            check(f"decode {ctx(L)} B=4 flux_sa75 vs best flux_fa (tokens/s)",
                  b["ms_per_step"] / a["ms_per_step"], 2.2, f"{a['mode']} vs {b['mode']}")
        la, lf = self.largest.get(("sdpa", L)), self.largest.get(("flux_sa75", L))
        ok = la and lf and "largest" in la and "largest" in lf
        check(f"largest batch {ctx(L)} flux_sa75 vs sdpa", lf["largest"] / la["largest"] if ok else None, 3.0,
              f"{lf['largest']} vs {la['largest']}" if ok else "")
        check(f"aggregate decode tokens/s at the largest batch {ctx(L)} flux_sa75 vs sdpa",
              lf["tokens_per_s"] / la["tokens_per_s"] if ok else None, 3.0)
        if self.router:
            value = self.router.get("graph_ms", self.router["eager_ms"])
            out.append({"criterion": f"router overhead per layer at {ctx(self.router['length'])} (ms)",
                        "value": value, "target": 0.05, "pass": bool(value <= 0.05),
                        "detail": f"{'graph (GPU time)' if 'graph_ms' in self.router else 'eager'}; "
                                  f"eager {self.router['eager_ms']:.4f} ms"})
        else:
            out.append({"criterion": "router overhead per layer (ms)", "value": None, "target": 0.05,
                        "pass": None, "detail": ""})
        return out

    def summary(self, accept: List[dict]) -> str:
        lines = []

        def table(title, headers, rows):
            if rows:
                print(f"\n{title}")
                lines.append(title)
                lines.append(print_table(headers, rows))

        fmt = lambda x, f="{:.2f}": "-" if x is None else f.format(x)  # noqa: E731
        fused = any(c == "sdpa_fused" for c, _ in self.prefill)
        rows = [[f"{ctx(L)}" if L >= K else L, c + (" +fused" if self.args.fused_ops and not is_sdpa(c) else ""),
                 fmt(r["ms"], "{:.1f}"), fmt(r.get("speedup_vs_sdpa"))]
                + ([fmt(r.get("speedup_vs_sdpa_fused"))] if fused else [])
                + [fmt(r["floor_ms"], "{:.1f}"), fmt(100 * r["fraction_of_floor"], "{:.0f}"),
                   fmt(r.get("floor_speedup_vs_sdpa")), fmt(r["kv_bytes_per_sequence"] / 1e6, "{:.1f}")]
                for (c, L), r in sorted(self.prefill.items(), key=lambda t: (t[0][1], CONFIGS.index(t[0][0])))]
        table("Prefill (logits_to_keep=1, batch 1); speedup = sdpa ms / ms; floor: bench/e2e_floor.py",
              ["ctx", "config", "ms", "speedup"] + (["vs sdpa_fused"] if fused else [])
              + ["floor ms", "% floor", "floor speedup", "KV MB/seq"], rows)
        rows = [[f"{ctx(L)}" if L >= K else L, c, B, m, fmt(r["ms_per_step"]), fmt(r["tokens_per_s"], "{:.1f}"),
                 fmt(r.get("speedup_vs_sdpa")), fmt(r["floor_ms"]), fmt(100 * r["fraction_of_floor"], "{:.0f}"),
                 fmt(r["cache_bytes"] / 1e9, "{:.2f}")]
                for (c, L, B, m), r in sorted(self.decode.items(),
                                              key=lambda t: (t[0][1], CONFIGS.index(t[0][0]), t[0][2], t[0][3]))]
        table("Decode (greedy, StaticDecodeLoop); speedup = sdpa eager ms / ms at the same batch",
              ["ctx", "config", "B", "mode", "ms/step", "tok/s", "speedup", "floor ms", "% floor", "KV GB"], rows)
        rows = [[f"{ctx(L)}" if L >= K else L, c, r.get("largest", "-"), r.get("prefill_fit", "-"),
                 fmt(r["kv_bytes_per_sequence"] / 1e9), fmt(r.get("tokens_per_s"), "{:.0f}"),
                 " ".join(f"{a['batch']}:{a['result']}" for a in r.get("attempts", []))]
                for (c, L), r in sorted(self.largest.items(), key=lambda t: (t[0][1], CONFIGS.index(t[0][0])))]
        table("Largest batch (prefill one sequence at a time; decode confirmed at B)",
              ["ctx", "config", "largest", "prefill fit", "KV GB/seq", "tok/s", "attempts"], rows)
        if self.router:
            msg = (f"\nRouter overhead per layer at {ctx(self.router['length'])}: eager "
                   f"{self.router['eager_ms']:.4f} ms" + (f", CUDA graph {self.router['graph_ms']:.4f} ms"
                                                          if "graph_ms" in self.router else ""))
            print(msg)
            lines.append(msg)
        rows = [[a["criterion"], fmt(a["value"], "{:.3f}"), a["target"],
                 {True: "PASS", False: "FAIL", None: "not measured"}[a["pass"]], a["detail"]] for a in accept]
        table("Acceptance (issue 10)", ["criterion", "value", "target", "result", "detail"], rows)
        tail = (f"\n{len(self.errors)} failed step(s), {len(self.skipped)} skipped; "
                f"{time.monotonic() - T0:.0f} s in all")
        print(tail)
        return "\n".join(lines) + tail

    def plot(self, path: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        lengths = sorted({L for (_, L) in self.prefill})
        colors = plt.get_cmap("viridis")
        flux = [c for c in CONFIGS if not is_sdpa(c)]
        for i, c in enumerate(flux):
            color = colors(i / max(1, len(flux) - 1))
            pts = [(L, self.prefill[(c, L)]) for L in lengths if (c, L) in self.prefill
                   and self.prefill[(c, L)].get("speedup_vs_sdpa")]
            if pts:
                axes[0].plot([L for L, _ in pts], [r["speedup_vs_sdpa"] for _, r in pts], "o-",
                             color=color, label=c)
                axes[0].plot([L for L, _ in pts], [r["floor_speedup_vs_sdpa"] for _, r in pts], ":",
                             color=color)
            pts = []
            for L in lengths:
                best, base = self.best_decode(c, L, 1), self.decode.get(("sdpa", L, 1, "eager"))
                if best and base:
                    pts.append((L, base["ms_per_step"] / best["ms_per_step"]))
            if pts:
                axes[1].plot([L for L, _ in pts], [v for _, v in pts], "o-", color=color, label=c)
        for ax, title in zip(axes, ("prefill speedup vs sdpa (dotted: floor)",
                                    "decode speedup vs sdpa, batch 1 (best mode)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths)
            ax.set_xticklabels([f"{ctx(L)}" if L >= K else str(L) for L in lengths])
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xlabel("context (tokens)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{self.args.name}: Llama-3.1-8B shape, transformers, batch 1" if not self.args.tiny
                     else f"{self.args.name}: tiny Llama")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def write(self) -> None:
        self.speedups()
        # The plot is a generated binary: it goes to --out-dir (or runs/e2e/), never into
        # bench/results, which holds the text results that are committed.
        plot_dir = self.args.out_dir or os.path.join(ROOT, "runs", "e2e")
        os.makedirs(plot_dir, exist_ok=True)
        self.guarded("plot", self.plot, os.path.join(plot_dir, self.args.name + ".png"))
        accept = self.acceptance()
        text = self.summary(accept)
        payload = {
            "settings": {k: v for k, v in vars(self.args).items()},
            "model": {"shape": vars(self.shape), "weight_bytes": self.weight_bytes, "dtype": str(self.dtype)},
            "pattern": self.pattern,
            "configs": {c: {"sa_layers": self.sa_layers(c)} for c in CONFIGS if c in self.args.configs},
            "rates": self.rates,
            "prefill": list(self.prefill.values()),
            "decode": list(self.decode.values()),
            "largest_batch": list(self.largest.values()),
            "router_overhead": self.router,
            "acceptance": accept,
            "errors": self.errors,
            "skipped": self.skipped,
            "cuda_graph_error": self.graph_error,
            "elapsed_s": time.monotonic() - T0,
            "summary": text,
        }
        write_results(self.args.name, payload, [self.args.results_dir, self.args.out_dir])


def _rows(x, batch: int):
    """Next ids or positions (``[B]``, ``[B, 1]`` or an int) for ``batch`` copies of sequence 0."""
    if isinstance(x, int):
        return x
    return x.reshape(-1, 1)[:1].expand(batch, 1).contiguous()


def _replicate(cache, batch: int, device) -> bool:
    """The cache of ``batch`` copies of its sequence 0 (same bytes and decode work as ``batch``
    prefilled sequences of that length)."""
    cache.batch_select_indices(torch.zeros(batch, dtype=torch.long, device=device))
    return True


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8K and 32K; sdpa, flux_fa, flux_sa75, flux_sa100; "
                    "batch 1 and 4; no largest-batch search")
    ap.add_argument("--tiny", action="store_true", help="tiny Llama config (CPU by default): the pipeline, not speed")
    ap.add_argument("--device", default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="time budget from process start (default 320; "
                    "--quick 150)")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--configs", type=lambda s: s.split(","), default=None)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    ap.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per measurement")
    ap.add_argument("--no-largest", action="store_true", help="skip the largest-batch search")
    ap.add_argument("--fused-ops", action="store_true", help="flux configs also use flux_attention.fuse_ops "
                    "(fused RMSNorm, SiLU * up, rotary embedding, decode linears); adds the sdpa_fused anchor")
    ap.add_argument("--decode-linears", action=argparse.BooleanOptionalAction, default=True,
                    help="with --fused-ops: fuse_ops(decode_linears=...), the decode-step linear kernels")
    ap.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                    help="also decode by replaying a CUDA graph of the step (flux configs, CUDA)")
    ap.add_argument("--attn-tflops", type=float, default=650.0, help="attention rate of the floor")
    ap.add_argument("--cpu-largest-batch", type=int, default=3, help="largest batch tried on the CPU")
    ap.add_argument("--name", default=None, help="results file stem (default e2e_h200; e2e_tiny with --tiny)")
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--out-dir", default=os.environ.get("OUT", ""))
    args = ap.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.device != "cpu" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device here; use --tiny on a CPU")
    if args.device == "cpu" and not args.tiny:
        ap.error("the Llama-3.1-8B-shaped run needs a CUDA GPU; use --tiny on a CPU")
    if args.lengths is None:
        args.lengths = ([64, 128, 256] if args.tiny else
                        [8 * K, 32 * K] if args.quick else [8 * K, 32 * K, 64 * K, 128 * K])
    if args.configs is None:
        args.configs = ["sdpa", "flux_fa", "flux_sa75", "flux_sa100"] if args.quick else [
            c for c in CONFIGS if c != "sdpa_fused"]
        if args.fused_ops:
            args.configs.insert(1, "sdpa_fused")
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; known: {CONFIGS}")
    if "sdpa" not in args.configs:
        ap.error("--configs must include sdpa (the anchor every ratio is taken against)")
    if args.budget_s is None:
        args.budget_s = 150.0 if (args.quick or args.tiny) else 320.0
    if args.decode_steps is None:
        args.decode_steps = 2 if args.tiny else 8
    if args.quick:
        args.no_largest = True
    if args.name is None:
        args.name = ("e2e_tiny" if args.tiny else ("e2e_h200_quick" if args.quick else "e2e_h200")) + (
            "_fused" if args.fused_ops else "")
    return args


def main(argv=None) -> int:
    """Command line entry (the budget counts from process start); called from Python with ``argv``
    (tests), the budget counts from the call."""
    global T0
    if argv is not None:
        T0 = time.monotonic()
    args = parse(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny shapes: more threads only contend on a shared machine
    bench = Bench(args)
    log(f"e2e: {args.name} on {args.device}, lengths {args.lengths}, configs {args.configs}, "
        f"budget {args.budget_s:.0f} s")
    bench.guarded("model construction", bench.build)
    if bench.model is None:
        print("model construction failed; nothing measured")
        write_results(args.name, {"errors": bench.errors}, [args.results_dir, args.out_dir])
        return 1
    bench.guarded("ceilings", bench.measure_rates)
    if "linear" not in bench.rates or "copy" not in bench.rates:
        write_results(args.name, {"errors": bench.errors}, [args.results_dir, args.out_dir])
        return 1
    bench.guarded("plan", bench.run)
    bench.write()
    # Back to the plain model: fuse_ops patches a module global of transformers (the rotary
    # embedding), which must not outlive the run when main() is called from Python.
    bench.guarded("restore the model", bench.use, "sdpa")
    return 0


if __name__ == "__main__":
    sys.exit(main())
