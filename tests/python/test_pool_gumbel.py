"""pool_queries (the router's input) and gumbel_route (its training-time decision)."""

import math

import pytest
import torch

import flux_attention as fa
from reference import gumbel_route_ref, pool_ref
from utils import assert_close_rel, assert_matches, pack_varlen, randn

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def check_pool(name, out, q, dtype, **kw):
    ref = pool_ref(q, **kw)
    assert out.dtype == q.dtype and out.shape == ref.shape, name
    assert_matches(name, out, ref, lambda: pool_ref(q, dtype=dtype, **kw), dtype)


def check_pool_grad(name, fn, q, dtype, **kw):
    q = q.detach().requires_grad_()
    out = fn(q)
    dout = torch.randn(out.shape, device=q.device).to(dtype)
    (dq,) = torch.autograd.grad(out, q, dout)
    q64 = q.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(pool_ref(q64, **kw), q64, dout.double())
    q_low = q.detach().requires_grad_()
    lowp = lambda: torch.autograd.grad(pool_ref(q_low, dtype=dtype, **kw), q_low, dout)[0]
    assert dq.dtype == q.dtype and dq.shape == q.shape, name
    assert_matches(name, dq, want, lowp, dtype)


POOL_CASES = [  # (lengths, pool_size): empty, shorter than P, overlapping halves, exactly 2P, longer
    ([0, 1, 100, 150, 299, 300, 301, 500], 150),
    ([0, 1, 2, 5, 6, 7, 40], 3),
    ([9], 1),
]


@pytest.mark.parametrize("lengths,pool_size", POOL_CASES, ids=["p150", "p3", "p1"])
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
def test_pool_varlen(device, lengths, pool_size, dtype):
    q, cu = pack_varlen(lengths, 4, 64, dtype=dtype, device=device)
    out = fa.pool_queries(q, cu, pool_size)
    check_pool("pool varlen", out, q, dtype, cu_seqlens=cu, pool_size=pool_size)
    check_pool_grad("pool varlen grad", lambda x: fa.pool_queries(x, cu, pool_size), q, dtype,
                    cu_seqlens=cu, pool_size=pool_size)


def padded_with_mask(lengths, seqlen, heads, head_dim, dtype, device, left):
    """Padded q whose padding is NaN, and the [B, S] valid-token mask (left or right padded)."""
    q = randn(len(lengths), seqlen, heads, head_dim, dtype=dtype, device=device)
    mask = torch.zeros(len(lengths), seqlen, dtype=torch.bool, device=device)
    for b, n in enumerate(lengths):
        if left:
            mask[b, seqlen - n:] = True
        else:
            mask[b, :n] = True
    q[~mask] = math.nan
    return q, mask


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_pool_padded_mask(device, left, mask_dtype, dtype):
    q, mask = padded_with_mask([310, 0, 1, 200, 299], 310, 4, 64, dtype, device, left)
    mask = mask.to(mask_dtype)
    out = fa.pool_queries(q, pool_size=150, attention_mask=mask)
    check_pool("pool padded", out, q, dtype, pool_size=150, attention_mask=mask)
    check_pool_grad("pool padded grad", lambda x: fa.pool_queries(x, pool_size=150, attention_mask=mask), q, dtype,
                    pool_size=150, attention_mask=mask)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_pool_padded_no_mask(device, dtype):
    q = randn(3, 200, 8, 128, dtype=dtype, device=device)
    out = fa.pool_queries(q, pool_size=150)
    check_pool("pool padded", out, q, dtype, pool_size=150)


def test_pool_fp64_and_head_dims():
    for head_dim in (32, 96, 256):
        q, cu = pack_varlen([7, 0, 30], 3, head_dim, dtype=FP64, device="cpu")
        out = fa.pool_queries(q, cu, 5)
        check_pool(f"pool D={head_dim}", out, q, FP64, cu_seqlens=cu, pool_size=5)


def test_pool_gradcheck():
    cu = torch.tensor([0, 4, 4, 11], dtype=torch.int32)
    q = torch.randn(11, 2, 4, dtype=FP64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fa.pool_queries(x, cu, 3), (q,))
    q = torch.randn(2, 6, 2, 4, dtype=FP64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: fa.pool_queries(x, pool_size=2, attention_mask=mask), (q,))


# ----------------------------------------------------------------------------------------------
# gumbel_route
# ----------------------------------------------------------------------------------------------

def generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def draws(logits, seed):
    """The op's uniform draws: one torch.rand(logits.shape) from a generator seeded like the op's."""
    return torch.rand(logits.shape, generator=generator(logits.device, seed), device=logits.device)


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("hard", [True, False])
def test_gumbel_matches_seeded_noise(device, tau, hard):
    logits = torch.randn(257, 2, device=device) * 2
    z = fa.gumbel_route(logits, tau, hard, generator=generator(device, 7))
    ref = gumbel_route_ref(logits, draws(logits, 7), tau, hard)
    assert z.shape == (257,) and z.dtype == logits.dtype
    if hard:
        assert ((z == 0) | (z == 1)).all(), "hard gate values must be exactly 0 or 1"
        assert torch.equal(z.double().cpu(), ref.detach().cpu())
    else:
        assert_close_rel("soft gate", z, ref, 1e-6)


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.5])
@pytest.mark.parametrize("hard", [True, False])
def test_gumbel_backward_is_soft_gradient(device, tau, hard):
    """Straight-through: whatever the forward value, d z / d logits is that of softmax(...)[:, 1]."""
    logits = (torch.randn(100, 2, device=device) * 2).requires_grad_()
    weights = torch.randn(100, device=device)
    z = fa.gumbel_route(logits, tau, hard, generator=generator(device, 11))
    (grad,) = torch.autograd.grad(z, logits, weights)
    logits64 = logits.detach().double().requires_grad_()
    soft = gumbel_route_ref(logits64, draws(logits, 11), tau, hard=False)
    (want,) = torch.autograd.grad(soft, logits64, weights.double())
    assert_close_rel("gumbel grad", grad, want, 1e-5)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_gumbel_frequency(device, tau):
    """P(z = 1) = softmax(logits)[:, 1] for every tau: argmax((l + g) / tau) = argmax(l + g), the
    Gumbel-max trick. (tau shapes only the soft gradient; softmax(logits / tau) would be wrong for
    tau != 1, and the logits here are far enough apart for 4 sigma to tell the two apart.)"""
    rows = torch.tensor([[0.0, 0.0], [0.0, 2.0], [1.5, -0.5], [-3.0, 0.0]], device=device)
    n = 40000
    logits = rows.repeat(n, 1)
    z = fa.gumbel_route(logits, tau, True, generator=generator(device, 3))
    freq = z.view(n, len(rows)).double().mean(dim=0).cpu()
    p = torch.softmax(rows.double(), dim=-1)[:, 1].cpu()
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4 * sigma).all(), f"frequencies {freq.tolist()} vs softmax {p.tolist()}"


def test_gumbel_global_generator(device):
    """Without a generator the op draws from the default one: seeding it reproduces the gate."""
    logits = torch.randn(64, 2, device=device)
    torch.manual_seed(5)
    z1 = fa.gumbel_route(logits, 1.0, True)
    torch.manual_seed(5)
    u = torch.rand(logits.shape, device=device)
    assert torch.equal(z1.double(), gumbel_route_ref(logits, u, 1.0, True).detach())


@pytest.mark.parametrize("dtype", [BF16, FP16, FP64])
def test_gumbel_dtypes(device, dtype):
    logits = (torch.randn(50, 2, device=device) * 3).to(dtype).requires_grad_()
    z = fa.gumbel_route(logits, 1.0, True, generator=generator(device, 1))
    assert z.dtype == dtype and ((z == 0) | (z == 1)).all()
    ref = gumbel_route_ref(logits.detach(), draws(logits, 1), 1.0, True)
    assert torch.equal(z.double(), ref.detach())
    (grad,) = torch.autograd.grad(z.sum(), logits)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
