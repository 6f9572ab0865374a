"""The training loop: components built in a fixed order (distributed, model, data, optimisers,
checkpoint, metrics); ``train()`` steps until done or SIGTERM; every step is zero_grad, micro-batch
forward/backward, gradient all-reduce, clip, optimiser steps, log."""

from __future__ import annotations

import math
import random
import signal
import time
from typing import Dict

import numpy as np
import torch

import flux_attention as fa
from flux_attention import hf

from .checkpoint import CheckpointManager, rng_state, set_rng_state
from .config import TASK_CLASSES, JobConfig
from .data import Packer, record_source
from .loss import Multipliers, chunked_lm_loss, sparsity_loss
from .metrics import MetricsLogger, peak_memory_gib
from .model import build_model
from .parallel import all_reduce_grads, all_reduce_sum, close, init_distributed

__all__ = ["Trainer"]


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
        self.world = w = init_distributed(cfg.train.device, cfg.dist.timeout_s)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.model, self.tok, self.qkv = build_model(cfg, w.device)
        self.router_cfg = cfg.router_config()
        self.layers = sorted(hf.routers(self.model))
        self.router_params = [p for r in hf.routers(self.model).values() for p in r.parameters()]
        gen = torch.Generator().manual_seed(cfg.train.seed)  # same multipliers on every rank
        self.mult = Multipliers(len(TASK_CLASSES), cfg.loss.lambda_init, gen).to(w.device)
        self.packer = Packer(record_source(cfg.data), self.tok, cfg.data, w.rank, w.size)

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
        seed = cfg.train.seed + w.rank  # independent Gumbel noise per rank
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
        self.metrics = MetricsLogger(cfg.metrics, w.main, cfg.train.steps, self.step)
        self._sigterm = False
        self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

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
            record = self.train_step()
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

    def train_step(self) -> Dict:
        cfg, w, model = self.cfg, self.world, self.model
        start = time.perf_counter()
        tau = self.router_cfg.temperature(self.step - 1, cfg.train.steps)
        fa.set_router_temperature(model, tau)
        self.opt.zero_grad(set_to_none=True)
        self.lambda_opt.zero_grad(set_to_none=True)
        c, n_layers = len(TASK_CLASSES), len(self.layers)
        # loss, lm, reg, tokens, micro-batches | SA sum per class | count per class | SA per layer
        stats = torch.zeros(5 + 2 * c + n_layers, dtype=torch.float64)
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        for _ in range(cfg.train.grad_accum):
            pack = self.packer.next_pack().to(w.device)
            cu, m = pack.cu_seqlens, pack.max_seqlen
            hidden = decoder(input_ids=pack.input_ids[None], position_ids=pack.position_ids[None],
                             cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m,
                             use_cache=False).last_hidden_state[0]
            ce, n = chunked_lm_loss(head, hidden, pack.labels, cfg.loss.logit_chunk)
            lm = ce / max(n, 1)
            s = fa.collect_sparsity(model)
            reg = sparsity_loss(s, pack.tasks, self.mult, cfg.loss.targets)
            loss = lm + reg
            (loss / cfg.train.grad_accum).backward()
            sd, tasks = s.detach().double().cpu(), pack.tasks.cpu()
            stats[:5] += torch.tensor([loss.item(), lm.item(), reg.item(), pack.tokens, 1.0], dtype=torch.float64)
            stats[5:5 + c] += torch.zeros(c, dtype=torch.float64).index_add_(0, tasks, sd)
            stats[5 + c:5 + 2 * c] += torch.bincount(tasks, minlength=c).double()
            stats[5 + 2 * c:] += hf.routing_report(model).use_sparse.double().mean(1)
        trainable = self.router_params + self.qkv
        all_reduce_grads(trainable + list(self.mult.parameters()), w)
        norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.lambda_opt.step()
        self.sched.step()
        self.lambda_sched.step()
        stats = all_reduce_sum(stats.to(w.device), w).cpu()
        micro = stats[4].item()
        per_class, counts = stats[5:5 + c], stats[5 + c:5 + 2 * c]
        names = TASK_CLASSES
        return {
            "loss": stats[0].item() / micro, "lm_loss": stats[1].item() / micro, "reg_loss": stats[2].item() / micro,
            "sa_fraction": (per_class.sum() / counts.sum()).item(),
            "sa_fraction_per_task": {names[i]: (per_class[i] / counts[i]).item() for i in range(c) if counts[i] > 0},
            "sa_fraction_per_layer": (stats[5 + 2 * c:] / micro).tolist(),
            "lambda1": dict(zip(names, self.mult.lambda1.detach().cpu().tolist())),
            "lambda2": dict(zip(names, self.mult.lambda2.detach().cpu().tolist())),
            "tau": tau, "lr": lr, "grad_norm": norm.item(), "tokens": int(stats[3].item()),
            "tokens_per_s": stats[3].item() / (time.perf_counter() - start),
            "peak_mem_gib": peak_memory_gib(w.device),
        }

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._old_handler)
        self.metrics.close()
        close(self.world)
