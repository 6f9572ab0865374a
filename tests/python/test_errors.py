"""Bad input fails with a RuntimeError whose message starts with "flux_attention.<op>:", names the
offending argument and says what was expected and what was received."""

import re

import pytest
import torch

import flux_attention as fa

FP32 = torch.float32


def t(*shape, dtype=FP32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype) if dtype.is_floating_point else \
        torch.zeros(*shape, dtype=dtype, device=device)


def cu(values, device="cpu", dtype=torch.int32):
    return torch.tensor(values, dtype=dtype, device=device)


def raises(op, fragments, fn):
    """fn() must raise RuntimeError "flux_attention.<op>: ..." containing every fragment."""
    with pytest.raises(RuntimeError) as info:
        fn()
    message = str(info.value)
    assert message.startswith(f"flux_attention.{op}:"), message
    for fragment in fragments:
        assert re.search(fragment, message), f"{fragment!r} not in {message!r}"

# CPU_ONLY_NOTE: the argument checks are one code path for every device (csrc/ops/checks.cpp, run
# before any kernel), so the shape/argument cases run on CPU, where their small head dim (16) is
# legal. What differs by device has CUDA tests of its own: head dims, fp64, device mismatch.


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_head_dim_rejected_on_cuda():
    q = t(1, 4, 2, 48, device="cuda")
    raises("full_attention", [r"head_dim \(q\.size\(-1\)\) must be one of 32, 64, 96, 128, 256 on CUDA",
                              "got 48"], lambda: fa.full_attention(q, q, q))


def attention_error_cases(d):
    """(id, op, message fragments, call) for the checks shared by the three attention ops."""
    q4, k4, v4 = t(2, 8, 4, 16, device=d), t(2, 8, 2, 16, device=d), t(2, 8, 2, 16, device=d)
    q3, k3, v3 = t(10, 4, 16, device=d), t(10, 2, 16, device=d), t(10, 2, 16, device=d)
    c = cu([0, 4, 10], d)
    return [
        ("int_dtype", "q", [r"\bq must be bf16, fp16, fp32", r"got \[2, 8, 4, 16\] int32"],
         lambda op: op(t(2, 8, 4, 16, dtype=torch.int32, device=d), k4, v4)),
        ("mixed_dtype", "k", [r"\bk must have the dtype of q \(fp32\)", r"got \[2, 8, 2, 16\] bf16"],
         lambda op: op(q4, k4.bfloat16(), v4)),
        ("mixed_dtype_v", "v", [r"\bv must have the dtype of q", "fp16"],
         lambda op: op(q4, k4, v4.half())),
        ("gqa_ratio", "k.size", [r"k\.size\(2\) \(kv heads\) must divide q\.size\(2\)", r"\[2, 8, 3, 16\]"],
         lambda op: op(q4, t(2, 8, 3, 16, device=d), t(2, 8, 3, 16, device=d))),
        ("q_rank", "q", [r"\bq must be \[batch, seqlen_q, heads, head_dim\]", r"got \[8, 4, 16\]"],
         lambda op: op(t(8, 4, 16, device=d), k4, v4)),
        ("k_rank", "k", [r"\bk must be \[batch, seqlen_k, kv_heads, head_dim\]", r"got \[2, 8, 2, 16, 1\]"],
         lambda op: op(q4, t(2, 8, 2, 16, 1, device=d), v4)),
        ("head_dim_mismatch", "k.size(-1)", [r"k\.size\(-1\) \(head_dim\) must equal q\.size\(-1\) \(16\)",
                                             r"\[2, 8, 2, 32\]"],
         lambda op: op(q4, t(2, 8, 2, 32, device=d), v4)),
        ("v_head_dim", "v.size(-1)", [r"v\.size\(-1\)", r"\[2, 8, 2, 8\]"],
         lambda op: op(q4, k4, t(2, 8, 2, 8, device=d))),
        ("batch_mismatch", "k.size(0)", [r"k\.size\(0\) \(batch\) must equal q\.size\(0\) \(2\)"],
         lambda op: op(q4, t(3, 8, 2, 16, device=d), t(3, 8, 2, 16, device=d))),
        ("v_len_mismatch", "v.size(1)", [r"v\.size\(1\) must equal k\.size\(1\)"],
         lambda op: op(q4, k4, t(2, 9, 2, 16, device=d))),
        ("head_dim_512", "head_dim", [r"head_dim \(q\.size\(-1\)\)", "512"],
         lambda op: op(t(1, 4, 2, 512, device=d), t(1, 4, 2, 512, device=d), t(1, 4, 2, 512, device=d))),
        ("cu_only_q", "cu_seqlens", [r"needs both cu_seqlens_q and cu_seqlens_k"],
         lambda op: op(q3, k3, v3, cu_seqlens_q=c)),
        ("cu_varlen_rank", "q", [r"\bq must be \[total_q, heads, head_dim\] with cu_seqlens", r"\[2, 8, 4, 16\]"],
         lambda op: op(q4, k4, v4, cu_seqlens_q=c, cu_seqlens_k=c)),
        ("cu_dtype", "cu_seqlens_q", [r"cu_seqlens_q must be a 1-D int32 tensor", "int64"],
         lambda op: op(q3, k3, v3, cu_seqlens_q=cu([0, 4, 10], d, torch.int64), cu_seqlens_k=c)),
        ("cu_length", "cu_seqlens_k", [r"cu_seqlens_k must have 3 entries", r"got \[4\] int32"],
         lambda op: op(q3, k3, v3, cu_seqlens_q=c, cu_seqlens_k=cu([0, 4, 8, 10], d))),
        ("max_seqlen_negative", "max_seqlen_q", [r"max_seqlen_q must be non-negative; got -1"],
         lambda op: op(q3, k3, v3, cu_seqlens_q=c, cu_seqlens_k=c, max_seqlen_q=-1)),
    ]


def cpu_value_cases():
    """Checks that read cu_seqlens values: CPU only (CUDA must not sync the host to read them)."""
    q3, k3, v3 = t(10, 4, 16), t(10, 2, 16), t(10, 2, 16)
    c = cu([0, 4, 10])
    return [
        ("cu_not_monotone", "cu_seqlens_q", [r"cu_seqlens_q must be non-decreasing",
                                             r"cu_seqlens_q\[1\] = 6 > cu_seqlens_q\[2\] = 4"],
         lambda op: op(q3, k3, v3, cu_seqlens_q=cu([0, 6, 4, 10]), cu_seqlens_k=cu([0, 4, 4, 10]))),
        ("cu_first_nonzero", "cu_seqlens_k", [r"cu_seqlens_k\[0\] must be 0; got 1"],
         lambda op: op(q3, k3, v3, cu_seqlens_q=c, cu_seqlens_k=cu([1, 4, 10]))),
        ("cu_past_end", "cu_seqlens_q", [r"cu_seqlens_q\[-1\] = 11 exceeds the number of rows", r"\(10\)"],
         lambda op: op(q3, k3, v3, cu_seqlens_q=cu([0, 4, 11]), cu_seqlens_k=c)),
        ("max_seqlen_too_small", "max_seqlen_k", [r"max_seqlen_k \(3\) is smaller than the longest sequence",
                                                  r"\(6\)"],
         lambda op: op(q3, k3, v3, cu_seqlens_q=c, cu_seqlens_k=c, max_seqlen_k=3)),
    ]


def _flux(q, k, v, **kw):
    batch = kw["cu_seqlens_q"].numel() - 1 if "cu_seqlens_q" in kw else q.shape[0]
    return fa.flux_attention(q, k, v, torch.ones(batch, dtype=torch.bool, device=q.device), **kw)


OPS = {
    "full_attention": lambda q, k, v, **kw: fa.full_attention(q, k, v, causal=True, **kw),
    "sparse_attention": lambda q, k, v, **kw: fa.sparse_attention(q, k, v, **kw),
    "flux_attention": _flux,
}


@pytest.mark.parametrize("device", ["cpu"])  # see CPU_ONLY_NOTE
@pytest.mark.parametrize("op_name", list(OPS))
def test_attention_input_errors(device, op_name):
    for case_id, _, fragments, call in attention_error_cases(device):
        try:
            raises(op_name, fragments, lambda: call(OPS[op_name]))
        except AssertionError as e:
            raise AssertionError(f"case {case_id}: {e}") from None


@pytest.mark.parametrize("op_name", list(OPS))
def test_attention_cu_seqlens_value_errors(op_name):
    for case_id, _, fragments, call in cpu_value_cases():
        try:
            raises(op_name, fragments, lambda: call(OPS[op_name]))
        except AssertionError as e:
            raise AssertionError(f"case {case_id}: {e}") from None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp64_rejected_on_cuda():
    q = t(1, 4, 2, 16, dtype=torch.float64, device="cuda")
    raises("full_attention", [r"fp64 is supported on CPU only", r"got \[1, 4, 2, 16\] fp64 cuda:0"],
           lambda: fa.full_attention(q, q, q))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch():
    q = t(1, 4, 2, 16, device="cuda")
    k = t(1, 4, 2, 16)
    raises("full_attention", [r"\bk must be on the same device as q \(cuda:0\)", r"got \[1, 4, 2, 16\] fp32 cpu"],
           lambda: fa.full_attention(q, k, k.cuda()))
    raises("decode_attention", [r"k_cache must be on the same device as q"],
           lambda: fa.decode_attention(q[:, 0], t(1, 8, 2, 16), t(1, 8, 2, 16),
                                       cu([4], "cuda")))
    c = cu([0, 4])
    raises("full_attention", [r"cu_seqlens_q must be on the same device as q"],
           lambda: fa.full_attention(q[0], q[0], q[0], cu_seqlens_q=c, cu_seqlens_k=c.cuda()))


PATTERN_CASES = [
    (dict(sink_tokens=0), [r"sink_tokens must be positive; got 0"]),
    (dict(sink_tokens=-16), [r"sink_tokens must be positive; got -16"]),
    (dict(local_blocks=0), [r"local_blocks must be positive; got 0"]),
    (dict(block_size=0), [r"block_size must be positive; got 0"]),
    (dict(block_size=-4, sink_tokens=8), [r"block_size must be positive; got -4"]),
    (dict(sink_tokens=100, block_size=64), [r"sink_tokens \(100\) must be a multiple of block_size \(64\)"]),
]


@pytest.mark.parametrize("device", ["cpu"])  # see CPU_ONLY_NOTE
@pytest.mark.parametrize("kw,fragments", PATTERN_CASES)
def test_pattern_errors(device, kw, fragments):
    q = t(2, 8, 2, 16, device=device)
    flags = torch.tensor([True, False], device=device)
    raises("sparse_attention", fragments, lambda: fa.sparse_attention(q, q, q, **kw))
    raises("flux_attention", fragments, lambda: fa.flux_attention(q, q, q, flags, **kw))
    raises("decode_attention", fragments,
           lambda: fa.decode_attention(q[:, 0], q, q, cu([3, 8], device), use_sparse=flags, **kw))


@pytest.mark.parametrize("device", ["cpu"])  # see CPU_ONLY_NOTE
def test_use_sparse_errors(device):
    q = t(2, 8, 2, 16, device=device)
    for flags, got in ((torch.ones(3, dtype=torch.bool), r"got \[3\] bool"),
                       (torch.ones(2, 1, dtype=torch.bool), r"got \[2, 1\] bool"),
                       (torch.ones(2, dtype=torch.int32), r"got \[2\] int32")):
        raises("flux_attention", [r"use_sparse must be a 1-D bool tensor with one flag per sequence \(2\)", got],
               lambda: fa.flux_attention(q, q, q, flags.to(device)))
        raises("decode_attention", [r"use_sparse must be a 1-D bool tensor", got],
               lambda: fa.decode_attention(q[:, 0], q, q, cu([3, 8], device), use_sparse=flags.to(device)))


@pytest.mark.parametrize("device", ["cpu"])  # see CPU_ONLY_NOTE
def test_decode_errors(device):
    q = t(2, 4, 16, device=device)
    cache = t(2, 8, 2, 16, device=device)
    lens = cu([3, 8], device)
    cases = [
        ("q", [r"\bq must be \[batch, heads, head_dim\] or, for several new tokens per sequence, "
               r"\[batch, new_tokens, heads, head_dim\]", r"got \[2, 1, 1, 4, 16\]"],
         lambda: fa.decode_attention(q[:, None, None], cache, cache, lens)),
        ("multi-token gqa", [r"k_cache\.size\(2\) \(kv heads\) must divide q\.size\(2\)", r"\[2, 8, 3, 16\]"],
         lambda: fa.decode_attention(q[:, None], t(2, 8, 3, 16, device=device), t(2, 8, 3, 16, device=device),
                                     lens)),
        ("k_cache", [r"k_cache must be \[batch, capacity, kv_heads, head_dim\]", r"got \[2, 8, 32\]"],
         lambda: fa.decode_attention(q, cache.flatten(2), cache, lens)),
        ("v_cache", [r"v_cache must have the shape of k_cache", r"\[2, 9, 2, 16\]"],
         lambda: fa.decode_attention(q, cache, t(2, 9, 2, 16, device=device), lens)),
        ("v_cache dtype", [r"v_cache must have the dtype of q", "bf16"],
         lambda: fa.decode_attention(q, cache, cache.bfloat16(), lens)),
        ("head_dim", [r"k_cache\.size\(3\) \(head_dim\) must equal q\.size\(2\) \(16\)"],
         lambda: fa.decode_attention(q, t(2, 8, 2, 8, device=device), t(2, 8, 2, 8, device=device), lens)),
        ("gqa", [r"k_cache\.size\(2\) \(kv heads\) must divide q\.size\(1\)", r"\[2, 8, 3, 16\]"],
         lambda: fa.decode_attention(q, t(2, 8, 3, 16, device=device), t(2, 8, 3, 16, device=device), lens)),
        ("cache_seqlens dtype", [r"cache_seqlens must be a 1-D int32 tensor", "int64"],
         lambda: fa.decode_attention(q, cache, cache, lens.long())),
        ("cache_seqlens length", [r"cache_seqlens must have 2 entries", r"got \[3\] int32"],
         lambda: fa.decode_attention(q, cache, cache, cu([1, 2, 3], device))),
        ("batch", [r"k_cache\.size\(0\) must equal q\.size\(0\) \(batch\)", "block_table"],
         lambda: fa.decode_attention(q, t(3, 8, 2, 16, device=device), t(3, 8, 2, 16, device=device), lens)),
        ("block_table", [r"block_table must be an int32 tensor \[batch \(2\), max_pages\]", r"got \[2, 2\] int64"],
         lambda: fa.decode_attention(q, cache, cache, lens, block_table=torch.zeros(2, 2, dtype=torch.long,
                                                                                      device=device))),
        ("head_dim_512", [r"head_dim \(q\.size\(-1\)\)", "512"],
         lambda: fa.decode_attention(t(1, 2, 512, device=device), t(1, 4, 2, 512, device=device),
                                     t(1, 4, 2, 512, device=device), cu([4], device))),
    ]
    for case_id, fragments, call in cases:
        try:
            raises("decode_attention", fragments, call)
        except AssertionError as e:
            raise AssertionError(f"case {case_id}: {e}") from None


def test_decode_value_errors():
    """CPU reads cache_seqlens and the used block-table entries and rejects impossible values."""
    q, cache = t(2, 4, 16), t(2, 8, 2, 16)
    raises("decode_attention", [r"cache_seqlens\[1\] = 9 must lie in \[0, 8\]"],
           lambda: fa.decode_attention(q, cache, cache, cu([3, 9])))
    raises("decode_attention", [r"cache_seqlens\[0\] = -1"],
           lambda: fa.decode_attention(q, cache, cache, cu([-1, 2])))
    pages = t(4, 4, 2, 16)
    table = cu([[0, 1], [2, 7]])
    raises("decode_attention", [r"block_table\[1, 1\] = 7 is not a page of k_cache \(4 pages\)"],
           lambda: fa.decode_attention(q, pages, pages, cu([8, 5]), block_table=table))


@pytest.mark.parametrize("device", ["cpu"])  # see CPU_ONLY_NOTE
def test_append_kv_errors(device):
    cache = t(2, 8, 2, 16, device=device)
    k1 = t(2, 2, 16, device=device)
    pos = cu([3, 5], device)
    cases = [
        ("k_cache dim", [r"k_cache must be \[batch, capacity, kv_heads, head_dim\]", r"got \[2, 8, 32\]"],
         lambda: fa.append_kv(cache.flatten(2), cache, k1, k1, pos)),
        ("v_cache shape", [r"v_cache must have the shape of k_cache", r"\[2, 9, 2, 16\]"],
         lambda: fa.append_kv(cache, t(2, 9, 2, 16, device=device), k1, k1, pos)),
        ("dtype", [r"k_new must have the dtype of k_cache", "bf16"],
         lambda: fa.append_kv(cache, cache.clone(), k1.bfloat16(), k1.bfloat16(), pos)),
        ("k_new dim", [r"k_new must be \[batch, kv_heads, head_dim\] or \[batch, new_tokens, kv_heads, "
                       r"head_dim\]", r"got \[2, 32\]"],
         lambda: fa.append_kv(cache, cache.clone(), k1.flatten(1), k1.flatten(1), pos)),
        ("v_new shape", [r"v_new must have the shape of k_new", r"\[2, 1, 2, 16\]"],
         lambda: fa.append_kv(cache, cache.clone(), k1, k1[:, None], pos)),
        ("heads", [r"k_new must have the kv heads and head_dim of k_cache \(2, 16\)", r"got k_new \[2, 3, 16\]"],
         lambda: fa.append_kv(cache, cache.clone(), t(2, 3, 16, device=device), t(2, 3, 16, device=device), pos)),
        ("positions", [r"positions must be a 1-D int32 tensor with one entry per sequence \(2\)", "int64"],
         lambda: fa.append_kv(cache, cache.clone(), k1, k1, pos.long())),
        ("batch", [r"k_cache\.size\(0\) must equal k_new\.size\(0\) \(batch\)", "block_table"],
         lambda: fa.append_kv(t(3, 8, 2, 16, device=device), t(3, 8, 2, 16, device=device), k1, k1, pos)),
        ("block_table", [r"block_table must be an int32 tensor \[batch \(2\), max_pages\]", r"got \[2, 2\] int64"],
         lambda: fa.append_kv(cache, cache.clone(), k1, k1, pos,
                              block_table=torch.zeros(2, 2, dtype=torch.long, device=device))),
        ("strided cache", [r"k_cache and v_cache must have a contiguous last dimension"],
         lambda: fa.append_kv(t(2, 8, 2, 32, device=device)[..., ::2], cache.clone(), k1, k1, pos)),
    ]
    for case_id, fragments, call in cases:
        try:
            raises("append_kv", fragments, call)
        except AssertionError as e:
            raise AssertionError(f"case {case_id}: {e}") from None


def test_append_kv_value_errors():
    """CPU reads positions and the block-table entries the new rows land on."""
    cache, k2 = t(2, 8, 2, 16), t(2, 2, 2, 16)
    raises("append_kv", [r"positions\[1\] = 7 plus 2 new rows must fit the cache", r"\[0, 6\]"],
           lambda: fa.append_kv(cache, cache.clone(), k2, k2, cu([0, 7])))
    raises("append_kv", [r"positions\[0\] = -1"],
           lambda: fa.append_kv(cache, cache.clone(), k2, k2, cu([-1, 0])))
    pages = t(4, 4, 2, 16)
    table = cu([[0, 1], [2, 7]])
    raises("append_kv", [r"block_table\[1, 1\] = 7 is not a page of k_cache \(4 pages\)"],
           lambda: fa.append_kv(pages, pages.clone(), k2, k2, cu([0, 3]), block_table=table))


@pytest.mark.parametrize("device", ["cpu"])  # see CPU_ONLY_NOTE
def test_pool_errors(device):
    q = t(10, 2, 16, device=device)
    c = cu([0, 4, 10], device)
    cases = [
        ([r"\bq must be \[total, heads, head_dim\] with cu_seqlens", r"got \[10, 32\]"],
         lambda: fa.pool_queries(q.flatten(1), c)),
        ([r"\bq must be \[batch, seqlen, heads, head_dim\]", r"got \[10, 2, 16\]"],
         lambda: fa.pool_queries(q)),
        ([r"cu_seqlens must be a 1-D int32 tensor", "int64"],
         lambda: fa.pool_queries(q, c.long())),
        ([r"pool_size must be positive; got 0"], lambda: fa.pool_queries(q, c, 0)),
        ([r"attention_mask must be \[batch, seqlen\] = \[2, 5\]", r"got \[2, 4\] bool"],
         lambda: fa.pool_queries(q.view(2, 5, 2, 16), attention_mask=torch.ones(2, 4, dtype=torch.bool,
                                                                                  device=device))),
        ([r"attention_mask must be bool or integer", "fp32"],
         lambda: fa.pool_queries(q.view(2, 5, 2, 16), attention_mask=torch.ones(2, 5, device=device))),
        ([r"pass either cu_seqlens or attention_mask"],
         lambda: fa.pool_queries(q, c, attention_mask=torch.ones(2, 5, dtype=torch.bool, device=device))),
        ([r"\bq must be bf16, fp16, fp32", "int32"],
         lambda: fa.pool_queries(q.int(), c)),
    ]
    for fragments, call in cases:
        raises("pool_queries", fragments, call)
    if device == "cpu":
        raises("pool_queries", [r"cu_seqlens must be non-decreasing"], lambda: fa.pool_queries(q, cu([0, 6, 4])))


def test_gumbel_errors(device):
    raises("gumbel_route", [r"logits must be \[batch, 2\]", r"got \[4, 3\]"],
           lambda: fa.gumbel_route(t(4, 3, device=device)))
    raises("gumbel_route", [r"logits must be \[batch, 2\]", r"got \[4\]"],
           lambda: fa.gumbel_route(t(4, device=device)))
    raises("gumbel_route", [r"logits must be floating point", "int64"],
           lambda: fa.gumbel_route(torch.zeros(4, 2, dtype=torch.long, device=device)))
    raises("gumbel_route", [r"tau must be positive; got 0"], lambda: fa.gumbel_route(t(4, 2, device=device), 0.0))


@pytest.mark.parametrize("device", ["cpu"])  # see CPU_ONLY_NOTE
def test_torch_ops_raise_the_same(device):
    """The errors come from the C++ op, not the Python wrapper."""
    q = t(2, 8, 4, 16, device=device)
    raises("full_attention", [r"k\.size\(2\) \(kv heads\) must divide q\.size\(2\)"],
           lambda: torch.ops.flux_attention.full_attention(q, t(2, 8, 3, 16, device=device),
                                                           t(2, 8, 3, 16, device=device)))
