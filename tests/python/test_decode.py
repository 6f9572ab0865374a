"""decode_attention: one new token (or a few, q [B, Tq, Hq, D]) per sequence against a contiguous
or paged KV cache, and the decode step (append_kv + decode) inside a CUDA graph.

The decode result must equal the last row of the prefill op over the same keys (full_attention for
dense sequences, sparse_attention for use_sparse ones) and the float64 reference. Cache slots past
cache_seqlens, pages not in a sequence's block-table prefix and the unused block-table entries all
point at NaN.
"""

import math

import pytest
import torch

import flux_attention as fa
from reference import decode_ref
from utils import assert_matches, assert_same_up_to_order, randn

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
SMALL = dict(block_size=16, sink_tokens=16, local_blocks=2)


def make_sequences(lengths, heads_q, heads_k, head_dim, dtype, device):
    """Per sequence: queries for every position (the prefill input) and its keys/values."""
    return [(randn(n, heads_q, head_dim, dtype=dtype, device=device),
             randn(n, heads_k, head_dim, dtype=dtype, device=device),
             randn(n, heads_k, head_dim, dtype=dtype, device=device)) for n in lengths]


def contiguous_cache(seqs, capacity, heads_k, head_dim, dtype, device):
    k_cache = torch.full((len(seqs), capacity, heads_k, head_dim), math.nan, dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, math.nan)
    for b, (_, k, v) in enumerate(seqs):
        k_cache[b, :k.shape[0]] = k
        v_cache[b, :v.shape[0]] = v
    return k_cache, v_cache


def paged_cache(seqs, page_size, heads_k, head_dim, dtype, device, spare_pages=5):
    """Pages in shuffled order, spare NaN pages, and unused table entries pointing at NaN pages."""
    needed = [-(-q.shape[0] // page_size) for q, _, _ in seqs]
    num_pages = sum(needed) + spare_pages
    perm = torch.randperm(num_pages).tolist()
    k_cache = torch.full((num_pages, page_size, heads_k, head_dim), math.nan, dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, math.nan)
    max_pages = max(needed) + 2
    spare = perm[sum(needed):]
    table = torch.empty(len(seqs), max_pages, dtype=torch.int32)
    nxt = 0
    for b, (_, k, v) in enumerate(seqs):
        pages = perm[nxt:nxt + needed[b]]
        nxt += needed[b]
        row = pages + [spare[(b + i) % len(spare)] for i in range(max_pages - len(pages))]
        table[b] = torch.tensor(row, dtype=torch.int32)
        for i, page in enumerate(pages):
            rows = slice(i * page_size, min((i + 1) * page_size, k.shape[0]))
            n = rows.stop - rows.start
            k_cache[page, :n] = k[rows]
            v_cache[page, :n] = v[rows]
    return k_cache, v_cache, table.to(device)


def prefill_last_rows(seqs, flags, pattern):
    """The last row of the prefill op for each sequence, as [B, Hq, D] and lse [B, Hq]."""
    outs, lses = [], []
    for (q, k, v), sparse in zip(seqs, flags):
        if sparse:
            out, lse = fa.sparse_attention(q[None], k[None], v[None], **pattern)
        else:
            out, lse = fa.full_attention(q[None], k[None], v[None], causal=True)
        outs.append(out[0, -1])
        lses.append(lse[0, :, -1])
    return torch.stack(outs), torch.stack(lses)


def check_decode(name, out, lse, q, k_cache, v_cache, seqlens, dtype, prefill=None, **kw):
    ref_out, ref_lse = decode_ref(q, k_cache, v_cache, seqlens, **kw)
    lowp = {}

    def lowp_ref():
        if not lowp:
            lowp["v"] = decode_ref(q, k_cache, v_cache, seqlens, dtype=dtype, **kw)
        return lowp["v"]

    assert out.shape == q.shape and out.dtype == q.dtype, name
    lse_shape = (q.shape[0], q.shape[1]) if q.dim() == 3 else (q.shape[0], q.shape[2], q.shape[1])
    assert lse.shape == lse_shape and lse.dtype == FP32, name
    assert_matches(f"{name} out", out, ref_out, lambda: lowp_ref()[0], dtype)
    assert_matches(f"{name} lse", lse, ref_lse, lambda: lowp_ref()[1], dtype)
    if prefill is not None:
        # Two fp32-accumulating kernels over the same keys: they may differ by accumulation order only.
        for b in range(q.shape[0]):
            what = f"{name}: sequence {b} (cache_seqlens {int(seqlens[b])}) decode vs prefill's last row"
            assert_same_up_to_order(f"{what} out", out[b], prefill[0][b])
            assert_same_up_to_order(f"{what} lse", lse[b], prefill[1][b])


LENGTHS = [1, 17, 100, 129, 64, 33]
FLAG_CASES = {
    "dense": None,
    "all_sa": [True] * 6,
    "mixed": [True, False, True, True, False, True],
}


@pytest.mark.parametrize("flags", list(FLAG_CASES))
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_decode_matches_prefill(device, flags, paged, dtype):
    heads_q, heads_k, head_dim = 8, 2, 64
    flag_list = FLAG_CASES[flags]
    seqs = make_sequences(LENGTHS, heads_q, heads_k, head_dim, dtype, device)
    q = torch.stack([s[0][-1] for s in seqs])
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32, device=device)
    use_sparse = None if flag_list is None else torch.tensor(flag_list, device=device)
    if paged:
        k_cache, v_cache, table = paged_cache(seqs, 16, heads_k, head_dim, dtype, device)
    else:
        k_cache, v_cache = contiguous_cache(seqs, 140, heads_k, head_dim, dtype, device)
        table = None
    out, lse = fa.decode_attention(q, k_cache, v_cache, seqlens, block_table=table, use_sparse=use_sparse,
                                   **SMALL)
    prefill = prefill_last_rows(seqs, flag_list or [False] * len(seqs), SMALL)
    check_decode("decode", out, lse, q, k_cache, v_cache, seqlens, dtype, prefill=prefill, block_table=table,
                 use_sparse=use_sparse, **SMALL)


def decode_dtype_cases():
    cases = [pytest.param("cpu", d, id=f"cpu-{str(d)[6:]}") for d in (FP64, FP32, BF16, FP16)]
    if torch.cuda.is_available():
        cases += [pytest.param("cuda", d, id=f"cuda-{str(d)[6:]}", marks=pytest.mark.cuda)
                  for d in (FP32, BF16, FP16)]
    return cases


@pytest.mark.parametrize("device,dtype", decode_dtype_cases())
def test_decode_dtypes(device, dtype):
    seqs = make_sequences([50, 129, 7], 4, 4, 64, dtype, device)
    q = torch.stack([s[0][-1] for s in seqs])
    seqlens = torch.tensor([50, 129, 7], dtype=torch.int32, device=device)
    k_cache, v_cache, table = paged_cache(seqs, 32, 4, 64, dtype, device)
    use_sparse = torch.tensor([True, True, False], device=device)
    out, lse = fa.decode_attention(q, k_cache, v_cache, seqlens, block_table=table, use_sparse=use_sparse,
                                   **SMALL)
    check_decode("decode", out, lse, q, k_cache, v_cache, seqlens, dtype, block_table=table,
                 use_sparse=use_sparse, **SMALL)


def head_cases():
    grid = [(d, hq, hk) for d in (32, 64, 96, 128, 256) for hq, hk in ((4, 4), (8, 1))]
    grid += [(64, 16, 2), (128, 8, 2)]
    cases = [pytest.param("cpu", *g, id="cpu-D{}-{}x{}".format(*g)) for g in grid]
    if torch.cuda.is_available():
        cases += [pytest.param("cuda", *g, id="cuda-D{}-{}x{}".format(*g), marks=pytest.mark.cuda)
                  for g in grid if g[0] in (64, 128)]
    return cases


@pytest.mark.parametrize("device,head_dim,heads_q,heads_k", head_cases())
def test_decode_heads(device, head_dim, heads_q, heads_k):
    lengths = [90, 3, 129]
    seqs = make_sequences(lengths, heads_q, heads_k, head_dim, BF16, device)
    q = torch.stack([s[0][-1] for s in seqs])
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    k_cache, v_cache = contiguous_cache(seqs, 130, heads_k, head_dim, BF16, device)
    use_sparse = torch.tensor([True, False, True], device=device)
    out, lse = fa.decode_attention(q, k_cache, v_cache, seqlens, use_sparse=use_sparse, **SMALL)
    prefill = prefill_last_rows(seqs, use_sparse.tolist(), SMALL)
    check_decode("decode", out, lse, q, k_cache, v_cache, seqlens, BF16, prefill=prefill, use_sparse=use_sparse,
                 **SMALL)


def test_decode_empty_cache(device):
    """cache_seqlens = 0: the query sees no key (out 0, lse -inf); the cache is all NaN."""
    q = randn(3, 4, 64, dtype=FP32, device=device)
    seqs = make_sequences([0, 20, 0], 4, 2, 64, FP32, device)
    k_cache, v_cache = contiguous_cache(seqs, 32, 2, 64, FP32, device)
    seqlens = torch.tensor([0, 20, 0], dtype=torch.int32, device=device)
    out, lse = fa.decode_attention(q, k_cache, v_cache, seqlens)
    check_decode("decode empty", out, lse, q, k_cache, v_cache, seqlens, FP32)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()


def test_decode_scale(device):
    seqs = make_sequences([40, 41], 4, 2, 64, FP32, device)
    q = torch.stack([s[0][-1] for s in seqs])
    seqlens = torch.tensor([40, 41], dtype=torch.int32, device=device)
    k_cache, v_cache = contiguous_cache(seqs, 48, 2, 64, FP32, device)
    out, lse = fa.decode_attention(q, k_cache, v_cache, seqlens, scale=0.3)
    check_decode("decode scale", out, lse, q, k_cache, v_cache, seqlens, FP32, scale=0.3)


def test_decode_sparse_reads_only_sink_and_window(device):
    """An SA sequence's evicted keys (between the sink and the window) are NaN: never read."""
    n = 150
    seqs = make_sequences([n, n], 4, 2, 64, FP32, device)
    k_cache, v_cache = contiguous_cache(seqs, n, 2, 64, FP32, device)
    t = n - 1
    window_start = (t // 16 - 1) * 16  # SMALL: two local blocks of 16
    k_cache[0, 16:window_start] = math.nan
    v_cache[0, 16:window_start] = math.nan
    q = torch.stack([s[0][-1] for s in seqs])
    seqlens = torch.tensor([n, n], dtype=torch.int32, device=device)
    use_sparse = torch.tensor([True, False], device=device)
    out, lse = fa.decode_attention(q, k_cache, v_cache, seqlens, use_sparse=use_sparse, **SMALL)
    check_decode("decode evicted", out, lse, q, k_cache, v_cache, seqlens, FP32, use_sparse=use_sparse, **SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_default_pattern_long(device, paged):
    lengths = [4224, 2177, 2176, 300]
    seqs = make_sequences(lengths, 8, 2, 128, BF16, device)
    q = torch.stack([s[0][-1] for s in seqs])
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    use_sparse = torch.tensor([True, False, True, True], device=device)
    if paged:
        k_cache, v_cache, table = paged_cache(seqs, 64, 2, 128, BF16, device)
    else:
        k_cache, v_cache = contiguous_cache(seqs, 4300, 2, 128, BF16, device)
        table = None
    out, lse = fa.decode_attention(q, k_cache, v_cache, seqlens, block_table=table, use_sparse=use_sparse)
    prefill = prefill_last_rows(seqs, use_sparse.tolist(), {})
    check_decode("decode default", out, lse, q, k_cache, v_cache, seqlens, BF16, prefill=prefill,
                 block_table=table, use_sparse=use_sparse)


# ---- several new tokens per sequence (speculative decoding): q [B, Tq, Hq, D] -------------------

def multi_token_inputs(lengths, new_tokens, heads_q, heads_k, head_dim, dtype, device):
    """Sequences, and the decode query [B, Tq, Hq, D]: the last Tq prefill queries of a sequence
    that has at least Tq tokens (so decode must equal the prefill's last Tq rows), random rows for
    shorter ones (their first tokens sit at negative positions and see nothing)."""
    seqs = make_sequences(lengths, heads_q, heads_k, head_dim, dtype, device)
    q = randn(len(lengths), new_tokens, heads_q, head_dim, dtype=dtype, device=device)
    for b, (qs, _, _) in enumerate(seqs):
        if qs.shape[0] >= new_tokens:
            q[b] = qs[-new_tokens:]
    return seqs, q


def prefill_last_rows_multi(seqs, flags, pattern, new_tokens):
    """The last new_tokens rows of the prefill op per sequence (None where the sequence is shorter)."""
    rows = []
    for (q, k, v), sparse in zip(seqs, flags):
        if q.shape[0] < new_tokens:
            rows.append(None)
            continue
        if sparse:
            out, lse = fa.sparse_attention(q[None], k[None], v[None], **pattern)
        else:
            out, lse = fa.full_attention(q[None], k[None], v[None], causal=True)
        rows.append((out[0, -new_tokens:], lse[0, :, -new_tokens:]))
    return rows


@pytest.mark.parametrize("new_tokens", [2, 5, 8])
@pytest.mark.parametrize("flags", list(FLAG_CASES))
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_decode_multi_token_matches_prefill(device, new_tokens, flags, paged):
    """Tq new tokens, causal among themselves, each with the SA window of its own position (the
    SMALL pattern's 16-token blocks make the Tq tokens straddle block boundaries)."""
    heads_q, heads_k, head_dim, dtype = 8, 2, 64, BF16
    flag_list = FLAG_CASES[flags]
    seqs, q = multi_token_inputs(LENGTHS, new_tokens, heads_q, heads_k, head_dim, dtype, device)
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32, device=device)
    use_sparse = None if flag_list is None else torch.tensor(flag_list, device=device)
    if paged:
        k_cache, v_cache, table = paged_cache(seqs, 16, heads_k, head_dim, dtype, device)
    else:
        k_cache, v_cache = contiguous_cache(seqs, 140, heads_k, head_dim, dtype, device)
        table = None
    out, lse = fa.decode_attention(q, k_cache, v_cache, seqlens, block_table=table, use_sparse=use_sparse,
                                   **SMALL)
    assert out.shape == q.shape and lse.shape == (len(LENGTHS), heads_q, new_tokens)
    check_decode("decode multi-token", out, lse, q, k_cache, v_cache, seqlens, dtype, block_table=table,
                 use_sparse=use_sparse, **SMALL)
    prefill = prefill_last_rows_multi(seqs, flag_list or [False] * len(seqs), SMALL, new_tokens)
    for b, rows in enumerate(prefill):
        if rows is None:
            continue
        what = f"sequence {b} (length {LENGTHS[b]}, Tq {new_tokens}) decode vs prefill's last rows"
        assert_same_up_to_order(f"{what} out", out[b], rows[0])
        assert_same_up_to_order(f"{what} lse", lse[b], rows[1])


def test_decode_multi_token_one_token_equals_3d(device):
    """q [B, 1, Hq, D] is the 3-D call with a token axis: same values, lse [B, Hq, 1]."""
    seqs = make_sequences([40, 77], 4, 2, 64, FP32, device)
    k_cache, v_cache = contiguous_cache(seqs, 80, 2, 64, FP32, device)
    q = torch.stack([s[0][-1] for s in seqs])
    seqlens = torch.tensor([40, 77], dtype=torch.int32, device=device)
    out3, lse3 = fa.decode_attention(q, k_cache, v_cache, seqlens)
    out4, lse4 = fa.decode_attention(q[:, None], k_cache, v_cache, seqlens)
    assert out4.shape == (2, 1, 4, 64) and lse4.shape == (2, 4, 1)
    assert torch.equal(out4[:, 0], out3) and torch.equal(lse4[..., 0], lse3)


# ---- CUDA at the production shape (32 q heads, 8 kv heads, D = 128, sink 128 + 16 x 128) ---------

REAL = dict(heads_q=32, heads_k=8, head_dim=128)
KERNELS = [pytest.param("auto", id="tensor-core"), pytest.param("simt", id="cuda-core")]


def cuda_only():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda_only()
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("new_tokens", [1, 4])
def test_decode_cuda_production_shape(kernel, paged, new_tokens, monkeypatch):
    """Lengths around the SA window edges (2176 = sink + window), one long FA sequence, one empty
    cache slot, a capacity far above the lengths (many splits, most of them empty for short
    sequences); decode equals the float64 reference and the prefill op's last rows."""
    if kernel == "simt":
        monkeypatch.setenv("FLUX_DECODE_KERNEL", "simt")
    device, dtype = "cuda", BF16
    lengths = [9000, 2177, 2176, 300, 4500, 1]
    flags = [False, True, True, True, True, False]
    seqs, q = multi_token_inputs(lengths, new_tokens, REAL["heads_q"], REAL["heads_k"], REAL["head_dim"], dtype,
                                 device)
    if new_tokens == 1:
        q = q[:, 0]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    use_sparse = torch.tensor(flags, device=device)
    if paged:
        k_cache, v_cache, table = paged_cache(seqs, 128, REAL["heads_k"], REAL["head_dim"], dtype, device)
    else:
        k_cache, v_cache = contiguous_cache(seqs, 16384, REAL["heads_k"], REAL["head_dim"], dtype, device)
        table = None
    out, lse = fa.decode_attention(q, k_cache, v_cache, seqlens, block_table=table, use_sparse=use_sparse)
    check_decode("decode production shape", out, lse, q, k_cache, v_cache, seqlens, dtype, block_table=table,
                 use_sparse=use_sparse)
    for b, rows in enumerate(prefill_last_rows_multi(seqs, flags, {}, new_tokens)):
        if rows is None:
            continue
        o, l = (out[b], lse[b]) if new_tokens > 1 else (out[b][None], lse[b][:, None])
        what = f"sequence {b} (length {lengths[b]}) decode vs prefill"
        assert_same_up_to_order(f"{what} out", o, rows[0])
        assert_same_up_to_order(f"{what} lse", l, rows[1])


# The CUDA split kernels and the tuning knobs bench/decode.py times (all must be correct).
KERNEL_CONFIGS = {
    "tensor-core": {},
    "cuda-core": {"FLUX_DECODE_KERNEL": "simt"},
    "contiguous-warps": {"FLUX_DECODE_WARP_ORDER": "contiguous"},
    "two-ctas-per-sm": {"FLUX_DECODE_CTAS_PER_SM": "2", "FLUX_DECODE_WARP_ORDER": "contiguous"},
}


@pytest.mark.cuda
@cuda_only()
@pytest.mark.parametrize("dtype,heads", [(BF16, (32, 8)), (FP16, (32, 8)), (BF16, (8, 8)), (BF16, (16, 1)),
                                          (BF16, (64, 8))], ids=["bf16-gqa4", "fp16-gqa4", "mha", "mqa16", "gqa8"])
def test_decode_cuda_kernels_agree_with_reference(dtype, heads, monkeypatch):
    """Both CUDA kernels and the tuning knobs on the same inputs (batch 1 at 20K keys: one full
    wave of splits; batch 3 with odd lengths), against the reference; the tensor-core kernel's row
    tiles cover GQA groups of 1..16 (and 2 row tiles for 64 / 8 heads with 4 new tokens)."""
    heads_q, heads_k = heads
    cases = [([333, 4097, 17], 1), ([1000, 31], 4)]
    if heads == (32, 8):
        cases.insert(0, ([20000], 1))
    for lengths, new_tokens in cases:
        seqs, q = multi_token_inputs(lengths, new_tokens, heads_q, heads_k, 128, dtype, "cuda")
        if new_tokens == 1:
            q = q[:, 0]
        k_cache, v_cache = contiguous_cache(seqs, max(lengths) + 7, heads_k, 128, dtype, "cuda")
        seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        for name, env in KERNEL_CONFIGS.items():
            for var in ("FLUX_DECODE_KERNEL", "FLUX_DECODE_WARP_ORDER", "FLUX_DECODE_CTAS_PER_SM"):
                monkeypatch.delenv(var, raising=False)
            for var, value in env.items():
                monkeypatch.setenv(var, value)
            out, lse = fa.decode_attention(q, k_cache, v_cache, seqlens)
            check_decode(f"decode {name} {lengths} Tq={new_tokens}", out, lse, q, k_cache, v_cache, seqlens, dtype)


@pytest.mark.cuda
@cuda_only()
@pytest.mark.parametrize("head_dim,dtype", [(32, BF16), (64, FP16), (96, FP32), (128, BF16), (256, BF16)])
def test_decode_cuda_split_counts(head_dim, dtype, monkeypatch):
    """The combine kernel at every head dim (its thread layout depends on head_dim / 4) and at split
    counts from 2 up to the cap, forced with FLUX_DECODE_SPLITS: with 3000 keys at most 12 splits
    get keys, so most partials are empty (lse -inf, weight 0) and a 5-key sequence has a single one.
    Three new tokens give rows of several tokens and the causal mask among them."""
    heads_q, heads_k = 8, 2
    lengths = [3000, 5, 1201]
    for new_tokens in (1, 3):
        seqs, q = multi_token_inputs(lengths, new_tokens, heads_q, heads_k, head_dim, dtype, "cuda")
        if new_tokens == 1:
            q = q[:, 0]
        k_cache, v_cache = contiguous_cache(seqs, max(lengths) + 3, heads_k, head_dim, dtype, "cuda")
        seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        for splits in (2, 7, 12, 13, 128, 1000):
            monkeypatch.setenv("FLUX_DECODE_SPLITS", str(splits))
            out, lse = fa.decode_attention(q, k_cache, v_cache, seqlens)
            check_decode(f"decode D={head_dim} {dtype} Tq={new_tokens} splits={splits}", out, lse, q, k_cache,
                         v_cache, seqlens, dtype)


# ---- the decode step in a CUDA graph -----------------------------------------------------------

@pytest.mark.cuda
@cuda_only()
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("new_tokens", [1, 3])
def test_decode_step_cuda_graph(paged, new_tokens):
    """append_kv + cache_seqlens += Tq + decode_attention captured once in a CUDA graph, replayed
    with fresh q / k / v: every replay equals the same step run eagerly on a copy of the state and
    the float64 reference over the grown cache. The caches are NaN beyond the stored rows and the
    output buffers are NaN-poisoned before each replay."""
    device, dtype = "cuda", BF16
    hq, hk, d = REAL["heads_q"], REAL["heads_k"], REAL["head_dim"]
    lengths = [2300, 700, 5000]
    flags = torch.tensor([True, False, True], device=device)
    capacity = 6144
    seqs = make_sequences(lengths, 1, hk, d, dtype, device)
    if paged:
        page = 128
        # Map every page each sequence may grow into (a static table), in shuffled order.
        pages_per_seq = capacity // page
        perm = torch.randperm(len(lengths) * pages_per_seq + 3, device=device).to(torch.int32)
        table = perm[:len(lengths) * pages_per_seq].view(len(lengths), pages_per_seq).contiguous()
        k_cache = torch.full((perm.numel(), page, hk, d), math.nan, dtype=dtype, device=device)
        v_cache = torch.full_like(k_cache, math.nan)
        for b, (_, k, v) in enumerate(seqs):
            fa.append_kv(k_cache, v_cache, k[None], v[None], torch.zeros(1, dtype=torch.int32, device=device),
                         block_table=table[b:b + 1])
    else:
        table = None
        k_cache, v_cache = contiguous_cache(seqs, capacity, hk, d, dtype, device)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)

    q_s = randn(len(lengths), new_tokens, hq, d, dtype=dtype, device=device)
    k_s = randn(len(lengths), new_tokens, hk, d, dtype=dtype, device=device)
    v_s = randn(len(lengths), new_tokens, hk, d, dtype=dtype, device=device)
    q_in = q_s if new_tokens > 1 else q_s[:, 0]
    out_s = torch.empty_like(q_in)
    lse_s = torch.empty(len(lengths), hq, *([new_tokens] if new_tokens > 1 else []), device=device)

    def step(kc, vc, lens):
        fa.append_kv(kc, vc, k_s, v_s, lens, block_table=table)
        lens += new_tokens
        out, lse = fa.decode_attention(q_in, kc, vc, lens, block_table=table, use_sparse=flags)
        out_s.copy_(out)
        lse_s.copy_(lse)

    # Warm up (lazy init, kernel attributes) on a copy of the state, then capture on the real one.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(k_cache.clone(), v_cache.clone(), seqlens.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(k_cache, v_cache, seqlens)
    # Capturing ran nothing: the state is still the prefill's.
    assert seqlens.tolist() == lengths

    for replay in range(4):
        q_s.copy_(randn(*q_s.shape, dtype=dtype, device=device))
        k_s.copy_(randn(*k_s.shape, dtype=dtype, device=device))
        v_s.copy_(randn(*v_s.shape, dtype=dtype, device=device))
        eager_state = (k_cache.clone(), v_cache.clone(), seqlens.clone())
        out_s.fill_(math.nan)
        lse_s.fill_(math.nan)
        graph.replay()
        got = (out_s.clone(), lse_s.clone())
        step(*eager_state)
        assert torch.equal(got[0], out_s) and torch.equal(got[1], lse_s), f"replay {replay}: graph != eager"
        assert torch.equal(eager_state[2], seqlens), f"replay {replay}: cache_seqlens"
        assert seqlens.tolist() == [n + new_tokens * (replay + 1) for n in lengths]
        check_decode(f"graph replay {replay}", got[0], got[1], q_in, k_cache, v_cache, seqlens, dtype,
                     block_table=table, use_sparse=flags)
