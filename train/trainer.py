"""The training loop: components built in a fixed order (distributed, model, data, optimisers,
checkpoint, metrics); ``train()`` steps until done or SIGTERM; every step is zero_grad, micro-batch
forward/backward, gradient all-reduce, clip, optimiser steps, log."""

from __future__ import annotations

import math
import os
import random
import re
import signal
import time
from typing import Dict

import numpy as np
import torch
import torch.distributed as dist

import flux_attention as fa
from flux_attention import hf

from .checkpoint import CheckpointManager, rng_state, set_rng_state
from .config import TASK_CLASSES, JobConfig
from .context_parallel import check_same_decisions, enable_context_parallel, local_shard
from .data import Pack, Packer, record_source
from .loss import Multipliers, head_loss, sparsity_loss
from .metrics import MetricsLogger, peak_memory_gib
from .model import all_full_attention, build_model
from .parallel import all_reduce_grads, all_reduce_sum, close, init_distributed, shard_frozen_base
from .step_stats import StepStats

__all__ = ["Trainer"]

# What gloo says when a peer is gone or silent (NCCL raises DistBackendError or its watchdog ends
# the process after dist.timeout_s).
_COLLECTIVE_FAILURE = re.compile(r"[Tt]imed out|Connection (closed|reset) by peer|gloo", re.IGNORECASE)


def _schedule(cfg: JobConfig):
    """Linear warmup over ``warmup_fraction`` of the steps, then cosine to ``min_lr_ratio``."""
    total, warm, floor = cfg.train.steps, math.ceil(cfg.optim.warmup_fraction * cfg.train.steps), cfg.optim.min_lr_ratio

    def factor(i: int) -> float:  # i = optimiser steps taken so far
        if i < warm:
            return (i + 1) / warm
        progress = (i - warm) / max(1, total - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
            torch.use_deterministic_algorithms(True)
        self.world = w = init_distributed(cfg.train.device, cfg.dist.timeout_s, cfg.dist.context_parallel)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.model, self.tok, self.qkv = build_model(cfg, w.device)
        self.router_cfg = cfg.router_config()
        self.layers = sorted(hf.routers(self.model))
        self.router_params = [p for r in hf.routers(self.model).values() for p in r.parameters()]
        if w.cp > 1:
            enable_context_parallel(self.model, w.cp_group)
        if cfg.dist.fsdp:
            local, total = shard_frozen_base(self.model, w, self.router_params + self.qkv)
            if w.main:
                print(f"fsdp: {local} of {total} base parameters on rank 0", flush=True)
        gen = torch.Generator().manual_seed(cfg.train.seed)  # same multipliers on every rank
        self.mult = Multipliers(len(TASK_CLASSES), cfg.loss.lambda_init, gen).to(w.device)
        # The ranks of a context-parallel group read the same packs (padded to a multiple of cp).
        self.packer = Packer(record_source(cfg.data), self.tok, cfg.data, w.dp_rank, w.dp, multiple=w.cp)

        o = cfg.optim
        groups = [{"params": self.router_params, "lr": o.lr, "weight_decay": o.weight_decay}]
        if self.qkv:
            groups += [{"params": [p for p in self.qkv if p.dim() > 1], "lr": cfg.model.qkv_lr,
                        "weight_decay": o.weight_decay},
                       {"params": [p for p in self.qkv if p.dim() == 1], "lr": cfg.model.qkv_lr,
                        "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], betas=tuple(o.betas))
        # Gradient ascent on the multipliers: the sparsity constraint binds harder while violated.
        self.lambda_opt = torch.optim.AdamW(self.mult.parameters(), lr=cfg.loss.lambda_lr, betas=tuple(o.betas),
                                            weight_decay=cfg.loss.lambda_weight_decay, maximize=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _schedule(cfg))
        self.lambda_sched = torch.optim.lr_scheduler.LambdaLR(self.lambda_opt, _schedule(cfg))

        self.step = 0
        # Independent Gumbel noise per pack stream; the ranks of a context-parallel group share it.
        seed = cfg.train.seed + w.dp_rank
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        self.ckpt = CheckpointManager(cfg.checkpoint.dir, cfg.checkpoint.keep_latest, w)
        self.resumed_from = None
        if cfg.checkpoint.resume:
            state = self.ckpt.load_latest(self.model)
            if state is not None:
                self.load_state_dict(state)
                self.resumed_from = state["path"]
                if w.main:
                    print(f"resumed from {state['path']} at step {self.step}", flush=True)
        if self.resumed_from is None and cfg.train.calibrate_packs:
            self._calibrate(cfg.train.calibrate_packs)
        self.metrics = MetricsLogger(cfg.metrics, w.main, cfg.train.steps, self.step)
        self._sigterm = False
        self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _calibrate(self, packs: int) -> None:
        """Routers' input normalisation from the pooled queries of ``packs`` packs per rank, read
        from a second packer over the same stream (the training stream is not consumed)."""
        cfg, w = self.cfg, self.world
        packer = Packer(record_source(cfg.data), self.tok, cfg.data, w.dp_rank, w.dp, multiple=w.cp)
        start = time.perf_counter()

        def run():
            for _ in range(packs):
                local = self._shard(packer.next_pack()).to(w.device)
                self._forward(local, local.cu_seqlens)

        # The calibration forwards draw Gumbel noise: from a forked generator, so the training
        # stream's randomness is that of a run without calibration.
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            try:
                fa.calibrate_routers(self.model, run, reduce=lambda t: all_reduce_sum(t, w))
            except ValueError as e:
                raise ValueError(f"train.calibrate_packs={packs}: {e}; raise train.calibrate_packs "
                                 "or set it to 0 (no input normalisation)") from e
        if w.main:
            print(f"routers: input normalisation calibrated on {packs} pack(s) per rank "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)

    def _on_sigterm(self, signum, frame):
        self._sigterm = True

    def state_dict(self) -> Dict:
        state = {"step": self.step, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "lambda_optimizer": self.lambda_opt.state_dict(), "lambda_scheduler": self.lambda_sched.state_dict(),
                 "multipliers": self.mult.state_dict(), "data": self.packer.state_dict(),
                 "rng": rng_state(self.world.device)}
        if self.qkv and self.world.main:
            names = {id(p): n for n, p in self.model.named_parameters()}
            state["qkv"] = {names[id(p)]: p.detach().cpu() for p in self.qkv}
        return state

    def load_state_dict(self, state: Dict) -> None:
        self.step = state["step"]
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.lambda_opt.load_state_dict(state["lambda_optimizer"])
        self.lambda_sched.load_state_dict(state["lambda_scheduler"])
        self.mult.load_state_dict(state["multipliers"])
        self.packer.load_state_dict(state["data"])
        if self.qkv:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, t in state["qkv"].items():
                    params[name].copy_(t)
        set_rng_state(state["rng"], self.world.device)

    def train(self) -> int:
        """Run to ``train.steps`` (or SIGTERM); returns the process exit code."""
        total = self.cfg.train.steps
        while self.step < total:
            self.step += 1
            try:
                record = self.train_step()
            except RuntimeError as e:  # gloo raises RuntimeError, NCCL DistBackendError (a subclass)
                if not (isinstance(e, dist.DistError) or _COLLECTIVE_FAILURE.search(str(e))):
                    raise
                raise RuntimeError(
                    f"rank {self.world.rank}: step {self.step}: a collective failed or did not finish "
                    f"within dist.timeout_s={self.cfg.dist.timeout_s} s; another rank has died or "
                    f"hangs ({type(e).__name__}: {e})") from e
            stop = self._stop_requested()
            self.metrics.log(self.step, record, force=self.step == total or stop)
            if stop or self.step % self.cfg.checkpoint.interval == 0 or self.step == total:
                self.ckpt.save(self.step, self.model, self.state_dict(),
                               {"config": self.cfg.to_dict(), "loss": record["loss"]})
            if stop:
                if self.world.main:
                    print(f"SIGTERM: checkpoint written at step {self.step}; exiting", flush=True)
                break
        return 0

    def _stop_requested(self) -> bool:
        flag = torch.tensor([float(self._sigterm)], device=self.world.device)
        return bool(all_reduce_sum(flag, self.world).item() > 0)

    def _shard(self, pack: Pack) -> Pack:
        """This rank's share of ``pack`` (host): its context-parallel slice, or the whole pack."""
        w = self.world
        return local_shard(pack, w.cp_rank, w.cp) if w.cp > 1 else pack

    def _forward(self, pack: Pack, device_cu: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[t, H]`` of this rank's tokens of ``pack``."""
        # cu_seq_lens_k is left out: it equals cu_seq_lens_q, and checking that would sync.
        return self.model.get_decoder()(
            input_ids=pack.input_ids[None], position_ids=pack.position_ids[None], cu_seq_lens_q=device_cu,
            max_length_q=pack.max_seqlen, use_cache=False).last_hidden_state[0]

    def _micro_step(self, pack: Pack, stats: StepStats) -> None:
        """Forward and backward of one pack (this rank's share of it)."""
        cfg, w = self.cfg, self.world
        share = 1.0 / w.cp  # each rank of a context-parallel group holds 1/cp of the pack
        host = self._shard(pack)
        # The labelled rows, found on the host (no device sync): when they are few (loss on the
        # answers only) the vocabulary projection runs on them alone.
        rows = torch.nonzero(host.labels >= 0).squeeze(1)
        rows = rows.to(w.device) if rows.numel() < host.labels.numel() // 2 else None
        local = host.to(w.device)
        teacher = None
        if cfg.loss.kl_weight:
            with torch.no_grad(), all_full_attention(self.model):
                teacher = self._forward(local, local.cu_seqlens)
        hidden = self._forward(local, local.cu_seqlens)
        loss_sum, ce, kl = head_loss(self.model.get_output_embeddings(), hidden, local.labels,
                                     cfg.loss.logit_chunk, cfg.loss.lm_weight, cfg.loss.kl_weight, teacher,
                                     rows=rows)
        s = fa.collect_sparsity(self.model)[:local.tasks.numel()]  # the pad sequence is not trained
        reg = sparsity_loss(s, local.tasks, self.mult, cfg.loss.targets)
        labelled = max(pack.labelled, 1)
        loss = loss_sum / labelled + reg * share  # the group's shares sum to the pack's loss
        (loss / cfg.train.grad_accum).backward()
        stats.add_pack(share, loss, ce, kl, reg, s, local.tasks, labelled, pack.real_tokens)
        decisions = hf.routing_report(self.model).use_sparse[:, :local.tasks.numel()]
        stats.add_decisions(decisions, share)
        if w.cp > 1:
            check_same_decisions(decisions, w)

    def train_step(self) -> Dict:
        cfg, w, model = self.cfg, self.world, self.model
        start = time.perf_counter()
        tau = self.router_cfg.temperature(self.step - 1, cfg.train.steps)
        fa.set_router_temperature(model, tau)
        self.opt.zero_grad(set_to_none=True)
        self.lambda_opt.zero_grad(set_to_none=True)
        stats = StepStats(TASK_CLASSES, len(self.layers), w.device)
        for _ in range(cfg.train.grad_accum):
            self._micro_step(self.packer.next_pack(), stats)
        trainable = self.router_params + self.qkv
        all_reduce_grads(trainable + list(self.mult.parameters()), w)
        norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.lambda_opt.step()
        self.sched.step()
        self.lambda_sched.step()
        record = stats.finish(w)
        elapsed = time.perf_counter() - start
        record.update({
            "lambda1": dict(zip(TASK_CLASSES, self.mult.lambda1.detach().cpu().tolist())),
            "lambda2": dict(zip(TASK_CLASSES, self.mult.lambda2.detach().cpu().tolist())),
            "tau": tau, "lr": lr, "grad_norm": norm.item(), "step_time_s": elapsed,
            "tokens_per_s": record["tokens"] / elapsed, "tokens_per_s_per_device": record["tokens"] / elapsed / w.size,
            "peak_mem_gib": peak_memory_gib(w.device),
        })
        return record

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._old_handler)
        self.metrics.close()
        close(self.world)
