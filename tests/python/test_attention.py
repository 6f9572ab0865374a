"""Forward tests of full_attention, sparse_attention and flux_attention against reference.py.

Every test compares every element of out and lse (lse = -inf exactly where a row sees no key), with
the op's freshly allocated outputs NaN-filled by conftest and the inputs' unused rows set to NaN.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import flux_attention as fa
from reference import attention_ref, visible_mask
from utils import assert_close_rel, assert_matches, assert_same_up_to_order, pack_varlen, randn

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def check_attention(name, out, lse, q, k, v, input_dtype, **ref_kwargs):
    """Compares (out, lse) with the float64 reference over the rows the op defines."""
    ref_out, ref_lse = attention_ref(q, k, v, **ref_kwargs)
    rows = ref_out.shape[0]
    varlen = ref_kwargs.get("cu_seqlens_q") is not None
    out_defined = out[:rows] if varlen else out
    lse_defined = lse[:, :rows] if varlen else lse
    lowp = {}

    def lowp_ref():
        if not lowp:
            lowp["v"] = attention_ref(q, k, v, dtype=input_dtype, **ref_kwargs)
        return lowp["v"]

    assert out.dtype == q.dtype, f"{name}: out dtype {out.dtype}, expected {q.dtype}"
    assert lse.dtype == FP32, f"{name}: lse dtype {lse.dtype}, expected float32"
    assert_matches(f"{name} out", out_defined, ref_out, lambda: lowp_ref()[0], input_dtype)
    assert_matches(f"{name} lse", lse_defined, ref_lse, lambda: lowp_ref()[1], input_dtype)


def max_len(cu):
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


# ----------------------------------------------------------------------------------------------
# The reference itself, against independent PyTorch code (no flux_attention kernels involved).
# ----------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs")
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 1), (37, 37), (20, 45), (45, 20)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads_q,heads_k", [(4, 4), (8, 2)])
def test_reference_matches_sdpa(seqlen_q, seqlen_k, causal, heads_q, heads_k):
    q = torch.randn(2, seqlen_q, heads_q, 16, dtype=FP64)
    k = torch.randn(2, seqlen_k, heads_k, 16, dtype=FP64)
    v = torch.randn(2, seqlen_k, heads_k, 16, dtype=FP64)
    out, lse = attention_ref(q, k, v, causal=causal, scale=0.3)
    mask = causal_lower_right(seqlen_q, seqlen_k) if causal else None
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    expected = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=0.3,
                                              enable_gqa=heads_q != heads_k).transpose(1, 2)
    group = heads_q // heads_k
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(group, 2)) * 0.3
    if causal:
        allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).tril(seqlen_k - seqlen_q)
        scores = scores.masked_fill(~allowed, -math.inf)
    expected_lse = torch.logsumexp(scores, dim=-1)
    empty_rows = torch.isinf(expected_lse)
    # SDPA returns NaN for rows that see no key; the contract says 0.
    expected = torch.where(empty_rows.transpose(1, 2).unsqueeze(-1), torch.zeros_like(expected), expected)
    assert_close_rel("reference out", out, expected, 1e-12)
    assert_close_rel("reference lse", lse, expected_lse, 1e-12)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(40, 40), (13, 40), (40, 13)])
@pytest.mark.parametrize("sink,local,block", [(4, 2, 4), (8, 3, 4), (5, 1, 3)])
def test_reference_streaming_mask_matches_rule(seqlen_q, seqlen_k, sink, local, block):
    mask = visible_mask(seqlen_q, seqlen_k, causal=True, streaming=True, sink_tokens=sink,
                        local_blocks=local, block_size=block)
    for i in range(seqlen_q):
        t = i + seqlen_k - seqlen_q
        for j in range(seqlen_k):
            sees = j <= t and (j < sink or j // block >= math.floor(t / block) - (local - 1))
            assert bool(mask[i, j]) == sees, (i, j)


def test_reference_empty_rows_zero_out_and_finite_grads():
    q = torch.randn(1, 6, 2, 8, dtype=FP64, requires_grad=True)
    k = torch.randn(1, 3, 2, 8, dtype=FP64, requires_grad=True)
    v = torch.randn(1, 3, 2, 8, dtype=FP64, requires_grad=True)
    out, lse = attention_ref(q, k, v, causal=True)  # rows 0-2 sit before the first key
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert torch.isneginf(lse[..., :3]).all() and torch.isfinite(lse[..., 3:]).all()
    dq, dk, dv = torch.autograd.grad((out, lse), (q, k, v), (torch.randn_like(out), torch.randn_like(lse)))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[:, :3], torch.zeros_like(dq[:, :3]))


# ----------------------------------------------------------------------------------------------
# full_attention
# ----------------------------------------------------------------------------------------------

LENGTHS = [(1, 1), (127, 127), (128, 128), (129, 129), (1000, 1000), (113, 203), (203, 113),
           (1, 129), (129, 1), (64, 1000)]


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", LENGTHS)
def test_full_lengths(device, seqlen_q, seqlen_k, causal, dtype):
    q = randn(2, seqlen_q, 4, 64, dtype=dtype, device=device)
    k = randn(2, seqlen_k, 2, 64, dtype=dtype, device=device)
    v = randn(2, seqlen_k, 2, 64, dtype=dtype, device=device)
    out, lse = fa.full_attention(q, k, v, causal=causal)
    assert out.shape == q.shape and lse.shape == (2, 4, seqlen_q)
    check_attention("full", out, lse, q, k, v, dtype, causal=causal)


HEAD_DIMS_CPU = [32, 64, 96, 128, 256]
HEAD_DIMS_CUDA = [64, 128]  # the head dims every CUDA build instantiates (DESIGN.md section 3)


def device_cases(cpu_values, cuda_values):
    cases = [pytest.param("cpu", x, id=f"cpu-{x}") for x in cpu_values]
    if torch.cuda.is_available():
        cases += [pytest.param("cuda", x, id=f"cuda-{x}", marks=pytest.mark.cuda) for x in cuda_values]
    return cases


@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
@pytest.mark.parametrize("device,head_dim", device_cases(HEAD_DIMS_CPU, HEAD_DIMS_CUDA))
def test_full_head_dims(device, head_dim, dtype):
    q = randn(2, 77, 4, head_dim, dtype=dtype, device=device)
    k = randn(2, 150, 4, head_dim, dtype=dtype, device=device)
    v = randn(2, 150, 4, head_dim, dtype=dtype, device=device)
    for causal in (False, True):
        out, lse = fa.full_attention(q, k, v, causal=causal)
        check_attention(f"full D={head_dim} causal={causal}", out, lse, q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("heads_q,heads_k", [(4, 4), (8, 2), (16, 2), (6, 1)], ids=["mha", "gqa4", "gqa8", "mqa6"])
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_full_gqa(device, heads_q, heads_k, dtype):
    q = randn(2, 130, heads_q, 64, dtype=dtype, device=device)
    k = randn(2, 130, heads_k, 64, dtype=dtype, device=device)
    v = randn(2, 130, heads_k, 64, dtype=dtype, device=device)
    out, lse = fa.full_attention(q, k, v, causal=True)
    check_attention("full gqa", out, lse, q, k, v, dtype, causal=True)


def dtype_cases():
    cases = [pytest.param("cpu", d, id=f"cpu-{str(d)[6:]}") for d in (FP64, FP32, BF16, FP16)]
    if torch.cuda.is_available():
        cases += [pytest.param("cuda", d, id=f"cuda-{str(d)[6:]}", marks=pytest.mark.cuda)
                  for d in (FP32, BF16, FP16)]
    return cases


@pytest.mark.parametrize("device,dtype", dtype_cases())
@pytest.mark.parametrize("causal", [False, True])
def test_full_dtypes(device, dtype, causal):
    q = randn(3, 200, 4, 64, dtype=dtype, device=device)
    k = randn(3, 170, 2, 64, dtype=dtype, device=device)
    v = randn(3, 170, 2, 64, dtype=dtype, device=device)
    out, lse = fa.full_attention(q, k, v, causal=causal)
    check_attention("full", out, lse, q, k, v, dtype, causal=causal)


def test_full_scale_and_large_logits(device):
    """An explicit scale replaces 1/sqrt(D); large scaled logits must not overflow the softmax."""
    q = randn(1, 90, 2, 64, dtype=FP32, device=device)
    k = randn(1, 90, 2, 64, dtype=FP32, device=device)
    v = randn(1, 90, 2, 64, dtype=FP32, device=device)
    for scale in (0.05, 3.0):
        out, lse = fa.full_attention(q, k, v, causal=True, scale=scale)
        check_attention(f"full scale={scale}", out, lse, q, k, v, FP32, causal=True, scale=scale)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_full_noncontiguous_packed_qkv(device, dtype):
    """q, k, v as strided views of one packed [B, S, 3, H, D] projection (the usual HF layout)."""
    qkv = randn(2, 140, 3, 4, 64, dtype=dtype, device=device)
    q, k, v = qkv.unbind(2)
    out, lse = fa.full_attention(q, k, v, causal=True)
    check_attention("full packed", out, lse, q, k, v, dtype, causal=True)


VARLEN_CASES = {
    "equal": ([5, 0, 129, 1, 64, 0], [5, 0, 129, 1, 64, 0]),
    "q_shorter": ([3, 0, 50, 129, 1], [10, 7, 70, 129, 200]),
    "k_shorter": ([10, 7, 70, 129, 200], [3, 0, 50, 129, 1]),
}


@pytest.mark.parametrize("case", list(VARLEN_CASES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_full_varlen(device, case, causal, dtype):
    lens_q, lens_k = VARLEN_CASES[case]
    q, cu_q = pack_varlen(lens_q, 4, 64, dtype=dtype, device=device)
    k, cu_k = pack_varlen(lens_k, 2, 64, dtype=dtype, device=device, extra_rows=5)
    v, _ = pack_varlen(lens_k, 2, 64, dtype=dtype, device=device, extra_rows=5)
    out, lse = fa.full_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q),
                                 max_seqlen_k=max(lens_k), causal=causal)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    check_attention("full varlen", out, lse, q, k, v, dtype, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                    causal=causal)


KEY_TILE_LENGTHS = [(1, 175), (129, 176), (300, 177), (64, 352), (200, 353), (129, 1000)]


@pytest.mark.parametrize("block_n", ["176", "128"])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_full_noncausal_hd128_key_tiles(device, monkeypatch, block_n, dtype):
    """Dense non-causal hd128 runs 176-key tiles on sm_90a (FLUX_SM90_FWD_BLOCK_N=128 forces 128):
    key counts on both sides of tile boundaries, GQA, padded and varlen, both widths against the
    reference. On other devices the knob changes nothing and the test still checks the op."""
    monkeypatch.setenv("FLUX_SM90_FWD_BLOCK_N", block_n)
    for seqlen_q, seqlen_k in KEY_TILE_LENGTHS:
        q = randn(2, seqlen_q, 8, 128, dtype=dtype, device=device)
        k = randn(2, seqlen_k, 2, 128, dtype=dtype, device=device)
        v = randn(2, seqlen_k, 2, 128, dtype=dtype, device=device)
        out, lse = fa.full_attention(q, k, v)
        check_attention(f"full hd128 {seqlen_q}x{seqlen_k}", out, lse, q, k, v, dtype)
    lens_q, lens_k = [1, 0, 176, 300, 129], [175, 9, 177, 353, 1000]
    q, cu_q = pack_varlen(lens_q, 8, 128, dtype=dtype, device=device)
    k, cu_k = pack_varlen(lens_k, 2, 128, dtype=dtype, device=device, extra_rows=5)
    v, _ = pack_varlen(lens_k, 2, 128, dtype=dtype, device=device, extra_rows=5)
    out, lse = fa.full_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q),
                                 max_seqlen_k=max(lens_k))
    check_attention("full hd128 varlen", out, lse, q, k, v, dtype, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_full_varlen_without_max_seqlen(device):
    """max_seqlen_* are optional: the op derives them from cu_seqlens."""
    q, cu = pack_varlen([30, 0, 90], 2, 32, dtype=FP32, device=device)
    k, _ = pack_varlen([30, 0, 90], 2, 32, dtype=FP32, device=device)
    v, _ = pack_varlen([30, 0, 90], 2, 32, dtype=FP32, device=device)
    out, lse = fa.full_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)
    check_attention("full varlen", out, lse, q, k, v, FP32, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)


def test_nan_behaviour(device):
    """NaN propagation contract.

    - A NaN anywhere in query row i of head h makes out[i, h, :] and lse[h, i] NaN; every other row
      and head stays finite (rows are independent; a NaN must not leak through shared tile maxima).
    - NaN outside a sequence is never read: padding, other sequences' rows in a varlen batch, rows
      past cu_seqlens[-1], cache slots past cache_seqlens and pages outside the block table. The
      varlen, decode and pooling tests put NaN in all of those in every case.
    - Inside a sequence a kernel may multiply a masked key's value by a zero probability, so a NaN in
      a key/value can reach rows that do not attend to it; no promise is made there.
    """
    q = randn(1, 100, 2, 64, dtype=FP32, device=device)
    k = randn(1, 100, 2, 64, dtype=FP32, device=device)
    v = randn(1, 100, 2, 64, dtype=FP32, device=device)
    q[0, 37, 1, 5] = float("nan")
    for causal in (False, True):
        out, lse = fa.full_attention(q, k, v, causal=causal)
        assert torch.isnan(out[0, 37, 1]).all() and torch.isnan(lse[0, 1, 37])
        finite = torch.ones_like(out, dtype=torch.bool)
        finite[0, 37, 1] = False
        assert torch.isfinite(out[finite]).all()
        lse_finite = torch.ones_like(lse, dtype=torch.bool)
        lse_finite[0, 1, 37] = False
        assert torch.isfinite(lse[lse_finite]).all()
    # The same for the streaming pattern, with the NaN row in a sequence of a varlen batch.
    q, cu = pack_varlen([40, 60], 2, 64, dtype=FP32, device=device)
    k, _ = pack_varlen([40, 60], 2, 64, dtype=FP32, device=device)
    v, _ = pack_varlen([40, 60], 2, 64, dtype=FP32, device=device)
    q[45, 0, 0] = float("nan")
    out, lse = fa.sparse_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=60, max_seqlen_k=60,
                                   block_size=16, sink_tokens=16, local_blocks=2)
    assert torch.isnan(out[45, 0]).all() and torch.isnan(lse[0, 45])
    finite = torch.ones(100, 2, dtype=torch.bool, device=device)
    finite[45, 0] = False
    assert torch.isfinite(out[:100][finite]).all() and torch.isfinite(lse[:, :100].T[finite]).all()


# ----------------------------------------------------------------------------------------------
# sparse_attention (streaming)
# ----------------------------------------------------------------------------------------------

# (block_size, sink_tokens, local_blocks): small blocks so the window matters at short lengths.
PATTERNS = [(16, 16, 2), (16, 32, 3), (8, 8, 1), (4, 12, 5)]


def pattern_kwargs(pattern):
    block, sink, local = pattern
    return dict(block_size=block, sink_tokens=sink, local_blocks=local)


def interesting_lengths(pattern):
    block, sink, local = pattern
    edge = sink + local * block
    return sorted({1, block - 1, block, block + 1, edge - 1, edge, edge + 1, 129})


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: "b{}s{}l{}".format(*p))
def test_sparse_lengths(device, pattern, dtype):
    kw = pattern_kwargs(pattern)
    for length in interesting_lengths(pattern):
        q = randn(2, length, 4, 64, dtype=dtype, device=device)
        k = randn(2, length, 2, 64, dtype=dtype, device=device)
        v = randn(2, length, 2, 64, dtype=dtype, device=device)
        out, lse = fa.sparse_attention(q, k, v, **kw)
        assert out.shape == q.shape and lse.shape == (2, 4, length)
        check_attention(f"sparse L={length}", out, lse, q, k, v, dtype, sparse=True, **kw)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(37, 100), (100, 37), (1, 150), (150, 1), (64, 1000)])
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_sparse_unequal_lengths(device, seqlen_q, seqlen_k, dtype):
    kw = pattern_kwargs((16, 16, 2))
    q = randn(2, seqlen_q, 4, 64, dtype=dtype, device=device)
    k = randn(2, seqlen_k, 4, 64, dtype=dtype, device=device)
    v = randn(2, seqlen_k, 4, 64, dtype=dtype, device=device)
    out, lse = fa.sparse_attention(q, k, v, **kw)
    check_attention("sparse", out, lse, q, k, v, dtype, sparse=True, **kw)


@pytest.mark.parametrize("heads_q,heads_k", [(4, 4), (8, 2), (16, 2), (6, 1)], ids=["mha", "gqa4", "gqa8", "mqa6"])
@pytest.mark.parametrize("device,head_dim", device_cases(HEAD_DIMS_CPU, HEAD_DIMS_CUDA))
def test_sparse_heads(device, head_dim, heads_q, heads_k):
    kw = pattern_kwargs((16, 32, 3))
    dtype = BF16
    q = randn(1, 150, heads_q, head_dim, dtype=dtype, device=device)
    k = randn(1, 150, heads_k, head_dim, dtype=dtype, device=device)
    v = randn(1, 150, heads_k, head_dim, dtype=dtype, device=device)
    out, lse = fa.sparse_attention(q, k, v, **kw)
    check_attention("sparse", out, lse, q, k, v, dtype, sparse=True, **kw)


@pytest.mark.parametrize("device,dtype", dtype_cases())
def test_sparse_dtypes(device, dtype):
    kw = pattern_kwargs((16, 16, 2))
    q = randn(2, 120, 4, 64, dtype=dtype, device=device)
    k = randn(2, 120, 2, 64, dtype=dtype, device=device)
    v = randn(2, 120, 2, 64, dtype=dtype, device=device)
    out, lse = fa.sparse_attention(q, k, v, **kw)
    check_attention("sparse", out, lse, q, k, v, dtype, sparse=True, **kw)


@pytest.mark.parametrize("case", list(VARLEN_CASES))
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_sparse_varlen(device, case, dtype):
    kw = pattern_kwargs((16, 16, 2))
    lens_q, lens_k = VARLEN_CASES[case]
    q, cu_q = pack_varlen(lens_q, 4, 64, dtype=dtype, device=device)
    k, cu_k = pack_varlen(lens_k, 2, 64, dtype=dtype, device=device, extra_rows=5)
    v, _ = pack_varlen(lens_k, 2, 64, dtype=dtype, device=device, extra_rows=5)
    out, lse = fa.sparse_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q),
                                   max_seqlen_k=max(lens_k), **kw)
    check_attention("sparse varlen", out, lse, q, k, v, dtype, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                    sparse=True, **kw)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_sparse_window_covering_sequence_equals_full(device, dtype):
    """When every causal key lies in the sink or the window, SA is exactly dense causal attention."""
    q = randn(2, 100, 4, 64, dtype=dtype, device=device)
    k = randn(2, 100, 2, 64, dtype=dtype, device=device)
    v = randn(2, 100, 2, 64, dtype=dtype, device=device)
    cases = [dict(block_size=16, sink_tokens=16, local_blocks=7),   # window reaches block 0 from block 6
             dict(block_size=128, sink_tokens=128, local_blocks=16),  # the default pattern
             dict(block_size=16, sink_tokens=112, local_blocks=1)]   # the sink covers the rest
    full_out, full_lse = fa.full_attention(q, k, v, causal=True)
    check_attention("full", full_out, full_lse, q, k, v, dtype, causal=True)
    for kw in cases:
        out, lse = fa.sparse_attention(q, k, v, **kw)
        assert_same_up_to_order(f"sparse {kw} vs full", out, full_out)
        assert_same_up_to_order(f"sparse {kw} vs full lse", lse, full_lse)


@pytest.mark.slow
@pytest.mark.parametrize("length", [17 * 128 + 1, 4224])
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_sparse_default_pattern_long(device, length, dtype):
    """The production pattern (128 sink tokens, 16 local blocks of 128) past the window edge."""
    q = randn(1, length, 4, 64, dtype=dtype, device=device)
    k = randn(1, length, 2, 64, dtype=dtype, device=device)
    v = randn(1, length, 2, 64, dtype=dtype, device=device)
    out, lse = fa.sparse_attention(q, k, v)
    check_attention("sparse default", out, lse, q, k, v, dtype, sparse=True)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_full_long(device, causal):
    q = randn(1, 4224, 4, 128, dtype=BF16, device=device)
    k = randn(1, 4224, 2, 128, dtype=BF16, device=device)
    v = randn(1, 4224, 2, 128, dtype=BF16, device=device)
    out, lse = fa.full_attention(q, k, v, causal=causal)
    check_attention("full long", out, lse, q, k, v, BF16, causal=causal)


# ----------------------------------------------------------------------------------------------
# flux_attention: per-sequence FA / SA in one launch
# ----------------------------------------------------------------------------------------------

FLUX_LENGTHS = [100, 37, 0, 64, 129, 1]
FLUX_MODES = {
    "all_fa": [False] * 6,
    "all_sa": [True] * 6,
    "alternating": [i % 2 == 0 for i in range(6)],
    "one_sa": [False, False, False, False, True, False],
}


@pytest.mark.parametrize("mode", list(FLUX_MODES))
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_flux_varlen(device, mode, dtype):
    kw = pattern_kwargs((16, 16, 2))
    flags = FLUX_MODES[mode]
    use_sparse = torch.tensor(flags, dtype=torch.bool, device=device)
    q, cu = pack_varlen(FLUX_LENGTHS, 4, 64, dtype=dtype, device=device)
    k, _ = pack_varlen(FLUX_LENGTHS, 2, 64, dtype=dtype, device=device)
    v, _ = pack_varlen(FLUX_LENGTHS, 2, 64, dtype=dtype, device=device)
    m = max(FLUX_LENGTHS)
    out, lse = fa.flux_attention(q, k, v, use_sparse, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m,
                                 max_seqlen_k=m, **kw)
    check_attention(f"flux {mode}", out, lse, q, k, v, dtype, cu_seqlens_q=cu, cu_seqlens_k=cu,
                    sparse=flags, **kw)
    # Each sequence must be what the single-mode op gives for it alone (same kernels, same math).
    for b, length in enumerate(FLUX_LENGTHS):
        if length == 0:
            continue
        s = slice(int(cu[b]), int(cu[b + 1]))
        qb, kb, vb = q[s].unsqueeze(0), k[s].unsqueeze(0), v[s].unsqueeze(0)
        if flags[b]:
            alone, alone_lse = fa.sparse_attention(qb, kb, vb, **kw)
        else:
            alone, alone_lse = fa.full_attention(qb, kb, vb, causal=True)
        assert_same_up_to_order(f"flux seq {b} vs alone", out[s], alone[0])
        assert_same_up_to_order(f"flux seq {b} vs alone lse", lse[:, s], alone_lse[0])


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_flux_padded(device, dtype):
    kw = pattern_kwargs((16, 32, 3))
    flags = [True, False, True, True]
    q = randn(4, 150, 4, 64, dtype=dtype, device=device)
    k = randn(4, 150, 1, 64, dtype=dtype, device=device)
    v = randn(4, 150, 1, 64, dtype=dtype, device=device)
    out, lse = fa.flux_attention(q, k, v, torch.tensor(flags, device=device), **kw)
    check_attention("flux padded", out, lse, q, k, v, dtype, sparse=flags, **kw)


@pytest.mark.slow
def test_flux_default_pattern_one_sa_among_long_fa(device):
    lengths = [3000, 2500, 129, 2177]
    flags = [False, True, False, True]
    q, cu = pack_varlen(lengths, 4, 128, dtype=BF16, device=device)
    k, _ = pack_varlen(lengths, 2, 128, dtype=BF16, device=device)
    v, _ = pack_varlen(lengths, 2, 128, dtype=BF16, device=device)
    out, lse = fa.flux_attention(q, k, v, torch.tensor(flags, device=device), cu_seqlens_q=cu,
                                 cu_seqlens_k=cu, max_seqlen_q=3000, max_seqlen_k=3000)
    check_attention("flux default", out, lse, q, k, v, BF16, cu_seqlens_q=cu, cu_seqlens_k=cu, sparse=flags)
