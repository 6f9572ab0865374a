"""decode_attention: one new token per sequence against a contiguous or paged KV cache.

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
    assert lse.shape == q.shape[:2] and lse.dtype == FP32, name
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
