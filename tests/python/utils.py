"""Comparison rules and input builders shared by the tests.

Low precision (fp16, bf16): the 2x rule of FlashAttention's tests. The op may be at most twice as
wrong as PyTorch computing the same thing in the same dtype, plus the dtype's own rounding noise:
    max|out - ref| <= 2 * max|ref_lowp - ref| + atol,  atol = 2 * max|(ref + 0.3 - 0.3) - ref|
with ref the float64 truth and ref_lowp the reference run in the low dtype.
fp32 / fp64: a fixed relative bound against the float64 truth (1e-5 / 1e-10 of max|ref|).
Non-finite reference values (lse = -inf of rows that see no key) must be matched exactly, and a
NaN anywhere in the output fails.
"""

import pytest
import torch

LOW_DTYPES = (torch.float16, torch.bfloat16)
REL_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def device_params(cpu=True, cuda=True):
    """pytest params for the devices a test runs on; CUDA only when present, marked `cuda`. A
    CUDA-only test (cpu=False) always has its `cuda` case, so that a CPU run deselects it (-m "not
    cuda") instead of reporting an empty parameter set as skipped."""
    params = [pytest.param("cpu", id="cpu")] if cpu else []
    if cuda and (torch.cuda.is_available() or not cpu):
        marks = [pytest.mark.cuda]
        if not torch.cuda.is_available():
            marks.append(pytest.mark.skipif(True, reason="needs a CUDA device"))
        params.append(pytest.param("cuda", id="cuda", marks=marks))
    return params


def _split_finite(name, out, ref):
    """Checks the non-finite positions of ref are reproduced exactly and out has no stray NaN/Inf;
    returns (out, ref) as float64 on the CPU with those positions zeroed."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    finite = torch.isfinite(ref)
    bad_nonfinite = ~finite & ~((out == ref) | (torch.isnan(out) & torch.isnan(ref)))
    assert not bad_nonfinite.any(), (
        f"{name}: {int(bad_nonfinite.sum())} elements where the reference is non-finite differ, "
        f"first at {tuple(bad_nonfinite.nonzero()[0].tolist())}: "
        f"out {out[bad_nonfinite][0].item()} ref {ref[bad_nonfinite][0].item()}")
    stray = finite & ~torch.isfinite(out)
    assert not stray.any(), (
        f"{name}: {int(stray.sum())} non-finite outputs where the reference is finite, first at "
        f"{tuple(stray.nonzero()[0].tolist())}: {out[stray][0].item()}")
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(finite, out, zero), torch.where(finite, ref, zero)


def _describe(out, ref):
    err = (out - ref).abs()
    if err.numel() == 0:
        return 0.0, 0.0, ()
    return err.max().item(), err.mean().item(), tuple(torch.unravel_index(err.argmax(), err.shape))


def rounding_noise(ref, dtype):
    """2 * max|(ref + 0.3 - 0.3) - ref| computed in `dtype`: what merely storing ref costs."""
    if ref.numel() == 0:
        return 0.0
    r = ref.detach().to(dtype)
    r = torch.where(torch.isfinite(r), r, torch.zeros_like(r))
    return 2 * ((r + 0.3 - 0.3) - r).abs().max().item()


def assert_within_2x(name, out, ref, ref_lowp, dtype=None, floor=0.0):
    """The 2x rule (module docstring); dtype sets the rounding-noise term (default out.dtype);
    floor is added to the bound where a test states why (e.g. long reductions)."""
    noise = rounding_noise(ref, dtype or out.dtype) + floor
    o, r = _split_finite(name, out, ref)
    lo, _ = _split_finite(name + " (low-precision reference)", ref_lowp, ref)
    err_max, err_mean, where = _describe(o, r)
    pt_max, pt_mean, _ = _describe(lo, r)
    bound = 2 * pt_max + noise
    assert err_max <= bound, (
        f"{name}: max|out-ref| = {err_max:.3e} (mean {err_mean:.3e}, worst at {where}) exceeds "
        f"2 * {pt_max:.3e} + {noise:.3e}; PyTorch in {ref_lowp.dtype}: max {pt_max:.3e}, "
        f"mean {pt_mean:.3e}")


def assert_close_rel(name, out, ref, rtol):
    """max|out - ref| <= rtol * max|ref| (and exact where ref is zero everywhere)."""
    o, r = _split_finite(name, out, ref)
    err_max, err_mean, where = _describe(o, r)
    scale = r.abs().max().item() if r.numel() else 0.0
    assert err_max <= rtol * scale, (
        f"{name}: max|out-ref| = {err_max:.3e} (mean {err_mean:.3e}, worst at {where}) exceeds "
        f"{rtol:.0e} * max|ref| = {rtol * scale:.3e}")


def assert_matches(name, out, ref, ref_lowp_fn, input_dtype):
    """Picks the rule by the dtype of the op's inputs; ref_lowp_fn() computes the low-precision
    reference only when the rule needs it."""
    if input_dtype in LOW_DTYPES:
        assert_within_2x(name, out, ref, ref_lowp_fn())
    else:  # the coarser of the inputs and the output (lse is fp32 even for fp64 inputs)
        assert_close_rel(name, out, ref, max(REL_TOL[input_dtype], REL_TOL.get(out.dtype, 0.0)))


def assert_same_up_to_order(name, out, other):
    """Two fp32-accumulating computations of the same result (e.g. decode vs prefill's last row):
    they may differ by accumulation order, i.e. fp32-level noise plus one rounding of the storage
    dtype: max|out - other| <= 1e-5 * max|other| + rounding_noise(other, dtype) (1e-10 for fp64)."""
    o, r = _split_finite(name, out, other)
    err_max, err_mean, where = _describe(o, r)
    rel = 1e-10 if out.dtype == torch.float64 else 1e-5
    bound = rel * (r.abs().max().item() if r.numel() else 0.0) + rounding_noise(other.float(), out.dtype)
    assert err_max <= bound, (
        f"{name}: max difference {err_max:.3e} (mean {err_mean:.3e}, worst at {where}) exceeds {bound:.3e}")


def randn(*shape, dtype, device, requires_grad=False):
    x = torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)
    return x.requires_grad_(requires_grad)


def pack_varlen(lengths, heads, head_dim, *, dtype, device, extra_rows=3):
    """Random packed sequences [sum(lengths) + extra_rows, heads, head_dim] whose trailing rows (past
    cu_seqlens[-1]) are NaN, and int32 cu_seqlens [B + 1] on `device`."""
    total = sum(lengths)
    x = randn(total + extra_rows, heads, head_dim, dtype=dtype, device=device)
    x[total:] = float("nan")
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return x, torch.tensor(cu, dtype=torch.int32, device=device)


def assert_all_finite(name, x):
    bad = ~torch.isfinite(x)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite elements, first at {tuple(bad.nonzero()[0].tolist())}"
