"""Backward of full_attention, sparse_attention and flux_attention.

Gradients of (out, lse) under one shared random (grad_out, grad_lse) are compared with float64
autograd through reference.py (2x rule for fp16/bf16, 1e-5 relative for fp32); gradcheck runs the
ops themselves in float64 on tiny shapes. Gradient rows outside every sequence must come back 0,
and grad_out rows there are NaN to prove the backward never reads them.
"""

import pytest
import torch

import flux_attention as fa
from reference import attention_ref
from utils import assert_matches, device_params, pack_varlen, randn

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@pytest.fixture
def deterministic():
    """Overridden by conftest's parametrization: CUDA runs every test twice, with the deterministic
    backward and with the default one (which may use atomics)."""
    return True


@pytest.fixture(autouse=True)
def _backward_mode(_poison_uninitialized_memory, deterministic):
    if not deterministic:
        torch.use_deterministic_algorithms(False)


def grads_of(fn, q, k, v, dout, dlse):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    outputs, grads = [], []
    if dout is not None:
        outputs.append(out)
        grads.append(dout.to(out.dtype))  # exact: dout is drawn in the op's dtype
    if dlse is not None:
        outputs.append(lse)
        grads.append(dlse.to(lse.dtype))
    # lse does not depend on v: an lse-only loss leaves v out of the graph.
    found = torch.autograd.grad(outputs, (q, k, v), grads, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip((q, k, v), found))


def check_grads(name, op_fn, q, k, v, dtype, *, with_dout=True, with_dlse=True, **ref_kwargs):
    """Runs op_fn(q, k, v) -> (out, lse) forward and backward and compares dq, dk, dv."""
    with torch.no_grad():
        out, lse = op_fn(q, k, v)
    varlen = ref_kwargs.get("cu_seqlens_q") is not None
    rows = int(ref_kwargs["cu_seqlens_q"][-1]) if varlen else None
    # Drawn in the dtypes the op receives them in, so the reference sees exactly the same values.
    dout = torch.randn(out.shape, device=out.device).to(out.dtype) if with_dout else None
    dlse = torch.randn(lse.shape, device=lse.device) if with_dlse else None
    if varlen:  # rows past cu_seqlens_q[-1]: the op's output there is unspecified, never read
        if dout is not None:
            dout[rows:] = float("nan")
        if dlse is not None:
            dlse[:, rows:] = float("nan")
    got = grads_of(op_fn, q, k, v, dout, dlse)

    def ref_grads(ref_dtype):
        """Gradients of the reference computed in ref_dtype (leaves in ref_dtype too, so the float64
        truth is not rounded back to the op's dtype)."""
        def ref_fn(q_, k_, v_):
            return attention_ref(q_, k_, v_, dtype=ref_dtype, **ref_kwargs)
        rd = None if dout is None else (dout[:rows] if varlen else dout)
        rl = None if dlse is None else (dlse[:, :rows] if varlen else dlse)
        return grads_of(ref_fn, q.to(ref_dtype), k.to(ref_dtype), v.to(ref_dtype), rd, rl)

    want = ref_grads(FP64)
    lowp = {}

    def lowp_grads():
        if not lowp:
            lowp["g"] = ref_grads(dtype)
        return lowp["g"]

    for i, gname in enumerate(("dq", "dk", "dv")):
        assert got[i].dtype == dtype and got[i].shape == (q, k, v)[i].shape, gname
        assert_matches(f"{name} {gname}", got[i], want[i], lambda i=i: lowp_grads()[i], dtype)


def full(causal, **kw):
    return lambda q, k, v: fa.full_attention(q, k, v, causal=causal, **kw)


def sparse(**kw):
    return lambda q, k, v: fa.sparse_attention(q, k, v, **kw)


SMALL = dict(block_size=16, sink_tokens=16, local_blocks=2)


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (129, 129), (113, 203), (203, 113), (1, 77), (77, 1)])
def test_full_grad(device, seqlen_q, seqlen_k, causal, dtype):
    q = randn(2, seqlen_q, 4, 64, dtype=dtype, device=device)
    k = randn(2, seqlen_k, 2, 64, dtype=dtype, device=device)
    v = randn(2, seqlen_k, 2, 64, dtype=dtype, device=device)
    check_grads("full", full(causal), q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("with_dout,with_dlse", [(True, False), (False, True)], ids=["out_only", "lse_only"])
@pytest.mark.parametrize("causal", [False, True])
def test_full_grad_single_output(device, with_dout, with_dlse, causal):
    """A loss of out alone or of lse alone (the other gradient arrives undefined)."""
    q = randn(2, 70, 4, 32, dtype=FP32, device=device)
    k = randn(2, 90, 2, 32, dtype=FP32, device=device)
    v = randn(2, 90, 2, 32, dtype=FP32, device=device)
    check_grads("full", full(causal), q, k, v, FP32, with_dout=with_dout, with_dlse=with_dlse, causal=causal)


@pytest.mark.parametrize("heads_q,heads_k", [(4, 4), (8, 2), (16, 2), (6, 1)], ids=["mha", "gqa4", "gqa8", "mqa6"])
def test_grad_gqa(device, heads_q, heads_k):
    q = randn(1, 100, heads_q, 64, dtype=BF16, device=device)
    k = randn(1, 100, heads_k, 64, dtype=BF16, device=device)
    v = randn(1, 100, heads_k, 64, dtype=BF16, device=device)
    check_grads("full gqa", full(True), q, k, v, BF16, causal=True)
    check_grads("sparse gqa", sparse(**SMALL), q, k, v, BF16, sparse=True, **SMALL)


def head_dim_cases():
    cases = [pytest.param("cpu", d, id=f"cpu-{d}") for d in (32, 96, 128, 256)]
    if torch.cuda.is_available():
        cases += [pytest.param("cuda", d, id=f"cuda-{d}", marks=pytest.mark.cuda) for d in (64, 128)]
    return cases


@pytest.mark.parametrize("device,head_dim", head_dim_cases())
@pytest.mark.parametrize("dtype", [FP32, FP16])
def test_grad_head_dims(device, head_dim, dtype):
    q = randn(1, 90, 2, head_dim, dtype=dtype, device=device)
    k = randn(1, 90, 2, head_dim, dtype=dtype, device=device)
    v = randn(1, 90, 2, head_dim, dtype=dtype, device=device)
    check_grads(f"full D={head_dim}", full(True), q, k, v, dtype, causal=True)


VARLEN_CASES = {
    "equal": ([5, 0, 129, 1, 64, 0], [5, 0, 129, 1, 64, 0]),
    "k_shorter": ([10, 7, 70, 129, 20], [3, 0, 50, 129, 1]),  # causal rows before the first key
}


@pytest.mark.parametrize("case", list(VARLEN_CASES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_full_grad_varlen(device, case, causal, dtype):
    lens_q, lens_k = VARLEN_CASES[case]
    q, cu_q = pack_varlen(lens_q, 4, 64, dtype=dtype, device=device)
    k, cu_k = pack_varlen(lens_k, 2, 64, dtype=dtype, device=device, extra_rows=4)
    v, _ = pack_varlen(lens_k, 2, 64, dtype=dtype, device=device, extra_rows=4)
    fn = full(causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
    check_grads("full varlen", fn, q, k, v, dtype, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal)


@pytest.mark.parametrize("pattern", [(16, 16, 2), (16, 32, 3), (4, 12, 5)], ids=lambda p: "b{}s{}l{}".format(*p))
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(100, 100), (37, 100), (100, 37), (129, 129)])
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_sparse_grad(device, pattern, seqlen_q, seqlen_k, dtype):
    kw = dict(block_size=pattern[0], sink_tokens=pattern[1], local_blocks=pattern[2])
    q = randn(2, seqlen_q, 4, 64, dtype=dtype, device=device)
    k = randn(2, seqlen_k, 2, 64, dtype=dtype, device=device)
    v = randn(2, seqlen_k, 2, 64, dtype=dtype, device=device)
    check_grads("sparse", sparse(**kw), q, k, v, dtype, sparse=True, **kw)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_sparse_grad_varlen(device, dtype):
    lens_q, lens_k = VARLEN_CASES["k_shorter"]
    q, cu_q = pack_varlen(lens_q, 4, 64, dtype=dtype, device=device)
    k, cu_k = pack_varlen(lens_k, 2, 64, dtype=dtype, device=device, extra_rows=4)
    v, _ = pack_varlen(lens_k, 2, 64, dtype=dtype, device=device, extra_rows=4)
    fn = sparse(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), **SMALL)
    check_grads("sparse varlen", fn, q, k, v, dtype, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, sparse=True, **SMALL)


FLUX_LENGTHS = [100, 37, 0, 64, 129, 1]


@pytest.mark.parametrize("flags", [[False] * 6, [True] * 6, [i % 2 == 0 for i in range(6)]],
                         ids=["all_fa", "all_sa", "alternating"])
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_flux_grad(device, flags, dtype):
    q, cu = pack_varlen(FLUX_LENGTHS, 4, 64, dtype=dtype, device=device)
    k, _ = pack_varlen(FLUX_LENGTHS, 2, 64, dtype=dtype, device=device)
    v, _ = pack_varlen(FLUX_LENGTHS, 2, 64, dtype=dtype, device=device)
    use_sparse = torch.tensor(flags, device=device)

    def fn(q_, k_, v_):
        return fa.flux_attention(q_, k_, v_, use_sparse, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=129,
                                 max_seqlen_k=129, **SMALL)

    check_grads("flux", fn, q, k, v, dtype, cu_seqlens_q=cu, cu_seqlens_k=cu, sparse=flags, **SMALL)


def test_flux_grad_padded(device):
    flags = [True, False, True]
    q = randn(3, 90, 4, 64, dtype=BF16, device=device)
    k = randn(3, 90, 1, 64, dtype=BF16, device=device)
    v = randn(3, 90, 1, 64, dtype=BF16, device=device)
    use_sparse = torch.tensor(flags, device=device)
    check_grads("flux padded", lambda a, b, c: fa.flux_attention(a, b, c, use_sparse, **SMALL), q, k, v, BF16,
                sparse=flags, **SMALL)


@pytest.mark.parametrize("mode", ["full", "full_causal", "sparse", "flux"])
def test_backward_op_given_exact_forward(device, mode):
    """attention_backward alone, fed the float64 reference's out and lse: separates backward bugs
    from forward bugs (the other gradient tests feed it the op's own forward)."""
    lengths = [129, 37, 0, 100]
    q, cu = pack_varlen(lengths, 4, 32, dtype=FP32, device=device, extra_rows=0)
    k, _ = pack_varlen(lengths, 2, 32, dtype=FP32, device=device, extra_rows=0)
    v, _ = pack_varlen(lengths, 2, 32, dtype=FP32, device=device, extra_rows=0)
    flags = [True, False, True, True]
    causal, sparse_mode, use_sparse = mode != "full", {"sparse": 1, "flux": 2}.get(mode, 0), None
    ref_kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, causal=causal, **SMALL)
    if mode == "sparse":
        ref_kw["sparse"] = True
    if mode == "flux":
        ref_kw["sparse"] = flags
        use_sparse = torch.tensor(flags, device=device)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = attention_ref(*leaves, **ref_kw)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    want = torch.autograd.grad((out, lse), leaves, (dout, dlse))
    got = torch.ops.flux_attention.attention_backward(
        dout.float(), dlse.float(), q, k, v, out.detach().float(), lse.detach().float(), cu, cu, 129, 129,
        causal, 32 ** -0.5, sparse_mode, use_sparse, SMALL["sink_tokens"], SMALL["local_blocks"],
        SMALL["block_size"])
    for g, w, name in zip(got, want, ("dq", "dk", "dv")):
        assert_matches(f"attention_backward {mode} {name}", g, w, None, FP32)


@pytest.mark.parametrize("device", device_params())
def test_backward_deterministic(device):
    """In deterministic mode (conftest turns it on) two backward passes agree bitwise."""
    q = randn(2, 300, 8, 64, dtype=BF16, device=device)
    k = randn(2, 300, 2, 64, dtype=BF16, device=device)
    v = randn(2, 300, 2, 64, dtype=BF16, device=device)
    dout = torch.randn(q.shape, device=device).to(BF16)
    for name, fn in (("full", full(True)), ("sparse", sparse(**SMALL))):
        first = grads_of(fn, q, k, v, dout, None)
        second = grads_of(fn, q, k, v, dout, None)
        for a, b, g in zip(first, second, ("dq", "dk", "dv")):
            assert torch.equal(a, b), f"{name} {g} differs between two deterministic backward passes"


# ----------------------------------------------------------------------------------------------
# gradcheck: the ops' own float64 backward against finite differences (CPU only: CUDA has no fp64)
# ----------------------------------------------------------------------------------------------

def leaf(*shape):
    return torch.randn(*shape, dtype=FP64, requires_grad=True)


def gradcheck_both(fn, inputs):
    """gradcheck of out (float64, strict) and of lse. lse is float32 even for float64 inputs, so its
    finite differences need a larger step and tolerance: with eps = 1e-3 the fp32 rounding of lse
    (~5e-7) costs ~1e-3 relative, second-order terms ~1e-6."""
    assert torch.autograd.gradcheck(lambda *x: fn(*x)[0], inputs)
    assert torch.autograd.gradcheck(lambda *x: fn(*x)[1], inputs, eps=1e-3, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_full(causal):
    q, k, v = leaf(2, 5, 4, 4), leaf(2, 7, 2, 4), leaf(2, 7, 2, 4)
    gradcheck_both(lambda a, b, c: fa.full_attention(a, b, c, causal=causal, scale=0.7), (q, k, v))


def test_gradcheck_full_varlen():
    cu = torch.tensor([0, 3, 3, 9], dtype=torch.int32)
    q, k, v = leaf(9, 2, 8), leaf(9, 1, 8), leaf(9, 1, 8)
    gradcheck_both(lambda a, b, c: fa.full_attention(a, b, c, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=6,
                                                     max_seqlen_k=6, causal=True), (q, k, v))


def test_gradcheck_sparse():
    q, k, v = leaf(1, 11, 2, 4), leaf(1, 11, 2, 4), leaf(1, 11, 2, 4)
    gradcheck_both(lambda a, b, c: fa.sparse_attention(a, b, c, block_size=2, sink_tokens=2, local_blocks=2),
                   (q, k, v))


def test_gradcheck_flux():
    cu = torch.tensor([0, 9, 18], dtype=torch.int32)
    use_sparse = torch.tensor([True, False])
    q, k, v = leaf(18, 2, 4), leaf(18, 2, 4), leaf(18, 2, 4)
    gradcheck_both(lambda a, b, c: fa.flux_attention(a, b, c, use_sparse, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                     max_seqlen_q=9, max_seqlen_k=9, block_size=2, sink_tokens=2,
                                                     local_blocks=1), (q, k, v))


# ----------------------------------------------------------------------------------------------
# Head dim 128 (the sm90 backward's main instantiation on Hopper) and long / production shapes
# ----------------------------------------------------------------------------------------------

HD128_CASES = ["full", "causal_lq_lt_lk", "varlen_causal", "sparse", "flux_varlen"]


@pytest.mark.parametrize("case", HD128_CASES)
def test_grad_hd128(device, case):
    """bf16 at D = 128 with GQA, ragged lengths against the 64 / 128-row tiles and NaN varlen tails."""
    d = 128
    if case in ("full", "causal_lq_lt_lk", "sparse"):
        lq, lk = {"full": (200, 200), "causal_lq_lt_lk": (70, 190), "sparse": (300, 300)}[case]
        q = randn(2, lq, 8, d, dtype=BF16, device=device)
        k = randn(2, lk, 2, d, dtype=BF16, device=device)
        v = randn(2, lk, 2, d, dtype=BF16, device=device)
        if case == "sparse":
            check_grads("sparse hd128", sparse(**SMALL), q, k, v, BF16, sparse=True, **SMALL)
        else:
            causal = case != "full"
            check_grads(f"{case} hd128", full(causal), q, k, v, BF16, causal=causal)
        return
    lengths = [129, 0, 300, 1, 64]
    q, cu = pack_varlen(lengths, 8, d, dtype=BF16, device=device)
    k, _ = pack_varlen(lengths, 2, d, dtype=BF16, device=device, extra_rows=5)
    v, _ = pack_varlen(lengths, 2, d, dtype=BF16, device=device, extra_rows=5)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=300, max_seqlen_k=300)
    if case == "varlen_causal":
        check_grads("varlen hd128", full(True, **kw), q, k, v, BF16, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    else:
        flags = [True, False, False, True, True]
        use_sparse = torch.tensor(flags, device=device)
        fn = lambda a, b, c: fa.flux_attention(a, b, c, use_sparse, **kw, **SMALL)  # noqa: E731
        check_grads("flux varlen hd128", fn, q, k, v, BF16, cu_seqlens_q=cu, cu_seqlens_k=cu, sparse=flags, **SMALL)


PRODUCTION = dict(block_size=128, sink_tokens=128, local_blocks=16)


@pytest.mark.slow
@pytest.mark.parametrize("device", device_params(cpu=False))
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "default"])
@pytest.mark.parametrize("case", ["causal_4k", "full_4k_hd64", "varlen_causal_8k", "sparse_prod_8k",
                                  "flux_prod_varlen"])
def test_grad_long(device, deterministic, case):
    """Long sequences on CUDA: thousands of query tiles per key block, the production streaming
    pattern (sink 128 + 16 local blocks of 128) and per-sequence routing at realistic lengths."""
    if case in ("causal_4k", "full_4k_hd64", "sparse_prod_8k"):
        s, d, causal = {"causal_4k": (4096, 128, True), "full_4k_hd64": (4096, 64, False),
                        "sparse_prod_8k": (8192, 128, True)}[case]
        q = randn(1, s, 8, d, dtype=BF16, device=device)
        k = randn(1, s, 2, d, dtype=BF16, device=device)
        v = randn(1, s, 2, d, dtype=BF16, device=device)
        if case == "sparse_prod_8k":
            check_grads(case, sparse(**PRODUCTION), q, k, v, BF16, sparse=True, **PRODUCTION)
        else:
            check_grads(case, full(causal), q, k, v, BF16, causal=causal)
        return
    lengths = [5000, 1500, 129, 0, 1000] if case == "varlen_causal_8k" else [8192, 4000, 2049]
    q, cu = pack_varlen(lengths, 8, 128, dtype=BF16, device=device)
    k, _ = pack_varlen(lengths, 2, 128, dtype=BF16, device=device, extra_rows=5)
    v, _ = pack_varlen(lengths, 2, 128, dtype=BF16, device=device, extra_rows=5)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    if case == "varlen_causal_8k":
        check_grads(case, full(True, **kw), q, k, v, BF16, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    else:
        flags = [True, False, True]
        use_sparse = torch.tensor(flags, device=device)
        fn = lambda a, b, c: fa.flux_attention(a, b, c, use_sparse, **kw, **PRODUCTION)  # noqa: E731
        check_grads(case, fn, q, k, v, BF16, cu_seqlens_q=cu, cu_seqlens_k=cu, sparse=flags, **PRODUCTION)
