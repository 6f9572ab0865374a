"""append_kv: new K/V rows written into a contiguous or paged cache at device-given positions.

A copy must be exact: every test compares the whole cache (written rows and untouched ones) with
the reference bit for bit. Argument errors live in test_errors.py.
"""

import math

import pytest
import torch

import flux_attention as fa
from reference import append_kv_ref
from utils import randn

BF16, FP32 = torch.bfloat16, torch.float32


def same(name, got, want):
    """Bitwise equality that treats NaN == NaN (caches carry NaN poison in unused slots)."""
    assert got.shape == want.shape and got.dtype == want.dtype, name
    both_nan = torch.isnan(got) & torch.isnan(want)
    bad = ~((got == want) | both_nan)
    assert not bad.any(), f"{name}: {int(bad.sum())} elements differ, first at {tuple(bad.nonzero()[0].tolist())}"


def make_cache(paged, batch, capacity, heads, dim, dtype, device, page=16):
    """NaN-filled cache (contiguous [B, capacity, H, D] or a shuffled page pool with spare pages)."""
    if not paged:
        k = torch.full((batch, capacity, heads, dim), math.nan, dtype=dtype, device=device)
        return k, torch.full_like(k, math.nan), None
    per_seq = capacity // page
    perm = torch.randperm(batch * per_seq + 3).to(torch.int32)
    table = perm[:batch * per_seq].view(batch, per_seq).to(device)
    k = torch.full((perm.numel(), page, heads, dim), math.nan, dtype=dtype, device=device)
    return k, torch.full_like(k, math.nan), table


@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("new_tokens", [1, 3, 40])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_append_kv_matches_reference(device, dtype, new_tokens, paged):
    batch, heads, dim, capacity = 3, 2, 64, 96
    k_cache, v_cache, table = make_cache(paged, batch, capacity, heads, dim, dtype, device)
    positions = torch.tensor([0, 17, capacity - new_tokens], dtype=torch.int32, device=device)
    k_new = randn(batch, new_tokens, heads, dim, dtype=dtype, device=device)
    v_new = randn(batch, new_tokens, heads, dim, dtype=dtype, device=device)
    want_k, want_v = append_kv_ref(k_cache, v_cache, k_new, v_new, positions, block_table=table)
    fa.append_kv(k_cache, v_cache, k_new, v_new, positions, block_table=table)
    same("k_cache", k_cache, want_k)
    same("v_cache", v_cache, want_v)


def test_append_kv_one_token_3d_and_repeated_steps(device):
    """[B, Hkv, D] rows, one decode step after another (positions = lengths before the append)."""
    batch, heads, dim = 4, 2, 32
    k_cache, v_cache, table = make_cache(True, batch, 64, heads, dim, FP32, device)
    lengths = torch.tensor([0, 5, 15, 31], dtype=torch.int32, device=device)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for _ in range(20):
        k1 = randn(batch, heads, dim, dtype=FP32, device=device)
        v1 = randn(batch, heads, dim, dtype=FP32, device=device)
        want_k, want_v = append_kv_ref(want_k, want_v, k1, v1, lengths, block_table=table)
        fa.append_kv(k_cache, v_cache, k1, v1, lengths, block_table=table)
        lengths += 1
    same("k_cache", k_cache, want_k)
    same("v_cache", v_cache, want_v)


def test_append_kv_strided_inputs(device):
    """k_new as a non-contiguous view (heads sliced, last dim contiguous) and as a view whose rows
    are not 16-byte aligned (the element-wise copy path on CUDA); the cache as a strided view of a
    larger buffer (every other kv head)."""
    batch, heads, dim = 2, 2, 64
    big = torch.full((batch, 50, 2 * heads, dim), math.nan, dtype=BF16, device=device)
    k_cache, v_cache = big[:, :, ::2], big[:, :, 1::2]
    positions = torch.tensor([3, 44], dtype=torch.int32, device=device)
    k_src = randn(batch, 2, 2 * heads, dim, dtype=BF16, device=device)[:, :, :heads]
    v_src = randn(batch, 2, heads, dim + 1, dtype=BF16, device=device)[..., 1:]
    want_k, want_v = append_kv_ref(k_cache, v_cache, k_src, v_src, positions)
    before = big.clone()
    fa.append_kv(k_cache, v_cache, k_src, v_src, positions)
    same("k_cache", k_cache, want_k)
    same("v_cache", v_cache, want_v)
    assert torch.isnan(big).sum() == torch.isnan(before).sum() - 2 * 2 * batch * heads * dim


def test_append_kv_then_decode_equals_decode_of_the_whole_cache(device):
    """The decode step's two halves agree: appending the last row then decoding equals decoding a
    cache that held that row already (same bits: same kernel, same keys)."""
    batch, hq, hk, dim, cap = 2, 8, 2, 64, 300
    full_k = randn(batch, cap, hk, dim, dtype=BF16, device=device)
    full_v = randn(batch, cap, hk, dim, dtype=BF16, device=device)
    lengths = torch.tensor([120, 257], dtype=torch.int32, device=device)
    k_cache, v_cache = full_k.clone(), full_v.clone()
    rows = torch.arange(batch, device=device)
    new_k = full_k[rows, lengths.long()].clone()
    new_v = full_v[rows, lengths.long()].clone()
    k_cache[rows, lengths.long()] = math.nan
    v_cache[rows, lengths.long()] = math.nan
    fa.append_kv(k_cache, v_cache, new_k, new_v, lengths)
    q = randn(batch, hq, dim, dtype=BF16, device=device)
    a = fa.decode_attention(q, k_cache, v_cache, lengths + 1)
    b = fa.decode_attention(q, full_k, full_v, lengths + 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_append_kv_cuda_drops_rows_outside_the_cache():
    """On CUDA positions are not read on the host: rows that would land outside the cache (or on an
    unmapped page) are not written, and nothing else is touched."""
    k_cache, v_cache, table = make_cache(True, 2, 32, 2, 64, BF16, "cuda")
    table[1, 1] = 10_000  # not a page of the pool
    positions = torch.tensor([30, 15], dtype=torch.int32, device="cuda")  # rows 32, 33 past capacity
    k_new = randn(2, 4, 2, 64, dtype=BF16, device="cuda")
    v_new = randn(2, 4, 2, 64, dtype=BF16, device="cuda")
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for b, t in ((0, 0), (0, 1), (1, 0)):  # the rows that do fit: seq 0 at 30, 31; seq 1 at 15
        pos = int(positions[b]) + t
        page, row = int(table[b, pos // 16]), pos % 16
        want_k[page, row] = k_new[b, t]
        want_v[page, row] = v_new[b, t]
    fa.append_kv(k_cache, v_cache, k_new, v_new, positions, block_table=table)
    torch.cuda.synchronize()
    same("k_cache", k_cache, want_k)
    same("v_cache", v_cache, want_v)


def test_append_kv_opcheck(device):
    k_cache, v_cache, table = make_cache(True, 2, 32, 2, 16, FP32, device)
    k_cache.normal_()
    v_cache.normal_()
    k_new = randn(2, 3, 2, 16, dtype=FP32, device=device)
    positions = torch.tensor([0, 9], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.flux_attention.append_kv.default,
                          (k_cache, v_cache, k_new, k_new.clone(), positions), dict(block_table=table))
    contiguous = torch.randn(2, 12, 2, 16, device=device)
    torch.library.opcheck(torch.ops.flux_attention.append_kv.default,
                          (contiguous, contiguous.clone(), k_new[:, 0], k_new[:, 0].clone(), positions))
