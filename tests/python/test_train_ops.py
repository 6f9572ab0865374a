"""Training building blocks against independent references: the routed FA/SA mix (values and
gradients, incl. dz), the fused head loss (cross-entropy + KL, values and hidden gradients), the
sync-free sparsity loss, selective activation checkpointing (attention not recomputed, same
gradients), and the absence of host syncs in a training forward/backward."""

import os
import sys
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from reference import attention_ref
from utils import assert_within_2x

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from flux_attention.mix import routed_mix  # noqa: E402

PATTERN = dict(sink_tokens=16, local_blocks=2, block_size=16)


def _mix_ref(q, k, v, z, cu, dtype):
    """out = z FA + (1 - z) SA by the dense-mask reference, in ``dtype``, differentiable."""
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, dtype=dtype, **PATTERN)
    fa = attention_ref(q, k, v, causal=True, **kw)[0]
    sa = attention_ref(q, k, v, sparse=True, **kw)[0]
    if cu is None:
        zt = z.view(-1, 1, 1, 1)
    else:
        zt = torch.repeat_interleave(z, cu.diff().long()).view(-1, 1, 1)
    return zt.to(fa.dtype) * fa + (1 - zt.to(fa.dtype)) * sa


@pytest.mark.parametrize("varlen", [True, False], ids=["varlen", "padded"])
def test_routed_mix_matches_reference(device, varlen):
    # fp32 on CPU (the ops keep lse in fp32 even for fp64 input), bf16 on CUDA; the 2x rule.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    heads, kv_heads, d = 4, 2, 64
    if varlen:
        lengths = [1, 37, 130, 16, 77]
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        shape_q, shape_k = (sum(lengths), heads, d), (sum(lengths), kv_heads, d)
        z = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0], device=device)
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    else:
        cu = None
        shape_q, shape_k = (3, 99, heads, d), (3, 99, kv_heads, d)
        z = torch.tensor([0.0, 1.0, 0.0], device=device)
        kw = {}
    q = torch.randn(shape_q, device=device, dtype=dtype)
    k = torch.randn(shape_k, device=device, dtype=dtype)
    v = torch.randn(shape_k, device=device, dtype=dtype)
    dout = torch.randn(shape_q, device=device, dtype=dtype)

    def run(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        zz = z.detach().to(torch.float64 if dt == torch.float64 else torch.float32).requires_grad_()  # router dtype
        out = fn(*leaves, zz)
        grads = torch.autograd.grad(out, leaves + [zz], dout.to(out.dtype))
        return [out] + list(grads)

    ours = run(lambda q_, k_, v_, z_: routed_mix(q_, k_, v_, z_, **kw, **PATTERN), dtype)
    ref = run(lambda q_, k_, v_, z_: _mix_ref(q_, k_, v_, z_, cu, torch.float64), torch.float64)
    low = run(lambda q_, k_, v_, z_: _mix_ref(q_, k_, v_, z_, cu, dtype), dtype)
    for name, a, b, c in zip(["out", "dq", "dk", "dv", "dz"], ours, ref, low):
        # dz[b] = <dout, FA - SA> sums up to ~40K products of outputs that each carry their
        # attention kernel's error: how those errors add up differs between our kernels and
        # PyTorch's by chance (a CPU with other vector units gives another order). A floor of 16
        # fp32 ulps of the largest |dz| keeps the rule about the kernels, not the dice.
        floor = 16 * torch.finfo(dtype).eps * b.abs().max().item() if name == "dz" else 0.0
        assert_within_2x(name, a.double(), b, c.double(), floor=floor)


def _head_ref(hidden, weight, labels, teacher, lm_w, kl_w):
    logits = hidden @ weight.t()
    valid = labels != -100
    ce = F.cross_entropy(logits.double(), labels, ignore_index=-100, reduction="sum")
    kl = torch.zeros((), dtype=torch.float64, device=hidden.device)
    if teacher is not None:
        logq = torch.log_softmax((teacher @ weight.t()).double(), -1)
        logp = torch.log_softmax(logits.double(), -1)
        kl = ((logq.exp() * (logq - logp)).sum(-1) * valid).sum()
    return lm_w * ce + kl_w * kl, ce, kl


@pytest.mark.parametrize("rows", [False, True], ids=["all-rows", "labelled-rows"])
@pytest.mark.parametrize("kl_w", [0.0, 0.7])
def test_head_loss_matches_full_logits(device, kl_w, rows):
    from train.loss import head_loss

    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    t, h, vocab = 37, 32, 53
    head = torch.nn.Linear(h, vocab, bias=False).to(device, dtype).requires_grad_(False)
    hidden = torch.randn(t, h, device=device, dtype=dtype)
    teacher = hidden + 0.3 * torch.randn_like(hidden)
    labels = torch.randint(0, vocab, (t,), device=device)
    labels[[0, 5, 6, 36]] = -100
    dl = 1.7  # an upstream gradient other than 1

    def run(fn, dt):
        x = hidden.detach().to(dt).requires_grad_()
        loss, ce, kl = fn(x, teacher.to(dt))
        (g,) = torch.autograd.grad(loss, x, torch.tensor(dl, dtype=loss.dtype, device=device))
        return loss, ce, kl, g

    # rows=: only the labelled rows are projected (the trainer's loss_on: answer path); the loss and
    # the gradient (zero on the unlabelled rows) must not change.
    idx = torch.nonzero(labels >= 0).squeeze(1) if rows else None
    ours = run(lambda x, tch: head_loss(head, x, labels, 8, 1.3, kl_w, tch if kl_w else None, rows=idx), dtype)
    ref = run(lambda x, tch: _head_ref(x, head.weight.to(x.dtype), labels, tch if kl_w else None, 1.3, kl_w),
              torch.float64)
    assert ours[2].item() >= 0
    names = ["loss", "ce", "kl", "dhidden"]
    if dtype == torch.float64:
        for name, a, b in zip(names, ours, ref):
            torch.testing.assert_close(a.double(), b, rtol=1e-9, atol=1e-9, msg=name)
    else:
        low = run(lambda x, tch: _head_ref(x, head.weight, labels, tch if kl_w else None, 1.3, kl_w), dtype)
        for name, a, b, c in zip(names, ours, ref, low):
            assert_within_2x(name, a.float(), b.float(), c.float())


def test_head_loss_refuses_bad_input():
    from train.loss import head_loss

    head = torch.nn.Linear(4, 7, bias=False)
    x, y = torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="head is trainable"):
        head_loss(head, x, y, 2)
    head.requires_grad_(False)
    with pytest.raises(ValueError, match="kl_weight > 0 needs teacher_hidden"):
        head_loss(head, x, y, 2, kl_weight=1.0)


def test_sparsity_loss_is_mean_over_present_classes():
    from train.loss import Multipliers, sparsity_loss

    mult = Multipliers(5, 0.5, torch.Generator().manual_seed(1))
    targets = [0.45, 0.45, 1.0, 1.0, 1.0]
    s = torch.tensor([0.1, 0.9, 0.5, 0.3, 1.0], dtype=torch.float64, requires_grad=True)
    tasks = torch.tensor([0, 2, 0, 4, 2])
    got = sparsity_loss(s, tasks, mult, targets)
    l1, l2 = mult.lambda1.double(), mult.lambda2.double()
    per = [l1[t] * abs(s[i] - targets[t]) + l2[t] * (s[i] - targets[t]) ** 2 for i, t in enumerate(tasks.tolist())]
    want = torch.stack([torch.stack([per[i] for i in range(5) if tasks[i] == c]).mean() for c in (0, 2, 4)]).mean()
    torch.testing.assert_close(got, want.to(got.dtype))


# ---------------------------------------------------------------------------------------------
# a tiny routed Llama, one packed training forward/backward


def _tiny_model(checkpointing: bool, save_attention: bool = True):
    from train.config import load_config
    from train.model import build_model

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                      [f"--model.activation_checkpointing={str(checkpointing).lower()}",
                       f"--model.save_attention={str(save_attention).lower()}"])
    model, _, _ = build_model(cfg, torch.device("cpu"))
    return model


def _pack():
    lengths = [150, 41, 300]
    total = sum(lengths)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (total,), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, 150, 191, 491], dtype=torch.int32)
    return ids, pos, cu, max(lengths)


def _train_pass(model, seed=0):
    import flux_attention as fa
    from flux_attention import hf
    from train.loss import Multipliers, head_loss, sparsity_loss

    ids, pos, cu, m = _pack()
    torch.manual_seed(seed)
    hidden = model.get_decoder()(input_ids=ids[None], position_ids=pos[None], cu_seq_lens_q=cu,
                                 max_length_q=m, use_cache=False).last_hidden_state[0]
    labels = torch.cat([ids[1:], ids.new_tensor([-100])])
    loss_sum, _, _ = head_loss(model.get_output_embeddings(), hidden, labels, 128)
    s = fa.collect_sparsity(model)
    mult = Multipliers(5, 0.5, torch.Generator().manual_seed(0))
    loss = loss_sum / ids.numel() + sparsity_loss(s, torch.tensor([0, 2, 1]), mult, [0.45, 0.45, 1, 1, 1])
    loss.backward()
    return [p.grad.clone() for r in hf.routers(model).values() for p in r.parameters()]


class _CountOps(TorchDispatchMode):
    """Records calls of the named ops (and where in our code or transformers they came from)."""

    def __init__(self, names):
        super().__init__()
        self.names, self.calls, self.where = names, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if any(name.startswith(n) for n in self.names):
            if not (name.startswith("aten::repeat_interleave") and (kwargs or {}).get("output_size") is not None):
                self.calls.append(name)
                self.where.append(" < ".join(f"{os.path.basename(f.filename)}:{f.lineno}"
                                             for f in reversed(traceback.extract_stack()[-14:-1])))
        return func(*args, **(kwargs or {}))


def test_selective_checkpointing_keeps_attention_and_gradients(one_thread):
    grads = {}
    counts = {}
    for name, ckpt, save in [("none", False, True), ("full", True, False), ("selective", True, True)]:
        torch.manual_seed(0)
        model = _tiny_model(ckpt, save)
        mode = _CountOps(["flux_attention::full_attention", "flux_attention::sparse_attention",
                          "flux_attention::attention_backward"])
        with mode:
            grads[name] = _train_pass(model)
        counts[name] = {n: mode.calls.count(n) for n in set(mode.calls)}
    layers = 2
    # Both forwards per layer, one backward per layer, none in layer 0: its q, k, v come from the
    # frozen embeddings and need no gradient.
    assert counts["none"] == {"flux_attention::full_attention": layers, "flux_attention::sparse_attention": layers,
                              "flux_attention::attention_backward": layers - 1}
    assert counts["full"]["flux_attention::full_attention"] == 2 * layers  # recomputed
    assert counts["selective"] == counts["none"]  # kept, not recomputed
    for name in ("full", "selective"):
        assert all(torch.equal(a, b) for a, b in zip(grads[name], grads["none"])), name
    assert any(g.abs().sum() > 0 for g in grads["none"])


def test_training_pass_has_no_host_syncs(one_thread):
    model = _tiny_model(True, True)
    # ops that read device values on the host (each a sync on CUDA)
    mode = _CountOps(["aten::_local_scalar_dense", "aten::equal", "aten::nonzero", "aten::is_nonzero",
                      "aten::unique", "aten::_unique", "aten::masked_select", "aten::repeat_interleave"])
    with mode:
        _train_pass(model)
    # transformers' mask preparation reads the position ids once per forward (not per layer);
    # nothing else may read device values on the host.
    ours = [w for w in mode.where if "masking_utils.py" not in w]
    assert ours == [] and len(mode.calls) <= 1, mode.where
