"""torch.library.opcheck on every op (schema, autograd registration, fake/Meta kernels, AOT dispatch)
and torch.compile(fullgraph=True) over the ops, forward and backward, against eager."""

import pytest
import torch
from torch.library import opcheck

import flux_attention as fa

ops = torch.ops.flux_attention
FP32, BF16 = torch.float32, torch.bfloat16
SMALL = dict(sink_tokens=16, local_blocks=2, block_size=16)


def make(*shape, device, dtype=FP32, grad=False):
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(grad)


def attention_samples(device, grad):
    q, k, v = make(2, 40, 4, 32, device=device, grad=grad), make(2, 50, 2, 32, device=device, grad=grad), \
        make(2, 50, 2, 32, device=device, grad=grad)
    qv, kv, vv = (make(45, 4, 32, device=device, grad=grad), make(45, 2, 32, device=device, grad=grad),
                  make(45, 2, 32, device=device, grad=grad))
    cu = torch.tensor([0, 20, 20, 45], dtype=torch.int32, device=device)
    flags = torch.tensor([True, False, True], device=device)
    return [
        (ops.full_attention.default, (q, k, v), dict(causal=False)),
        (ops.full_attention.default, (q, k, v), dict(causal=True, scale=0.2)),
        (ops.full_attention.default, (qv, kv, vv, cu, cu, 25, 25), dict(causal=True)),
        (ops.sparse_attention.default, (q, k, v), SMALL),
        (ops.sparse_attention.default, (qv, kv, vv, cu, cu, 25, 25), SMALL),
        (ops.flux_attention.default, (qv, kv, vv, flags, cu, cu, 25, 25), SMALL),
        (ops.flux_attention.default, (q, k, v, flags[:2]), SMALL),
    ]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "requires_grad"])
def test_opcheck_attention(device, grad):
    for op, args, kwargs in attention_samples(device, grad):
        opcheck(op, args, kwargs)


def test_opcheck_attention_backward(device):
    for op, args, kwargs in attention_samples(device, False):
        out, lse = op(*args, **kwargs)
        q, k, v = args[:3]
        kind = {"full_attention": 0, "sparse_attention": 1, "flux_attention": 2}[op.name().split("::")[1]]
        rest = list(args[3:])
        use_sparse = rest.pop(0) if kind == 2 else None
        rest += [None] * (4 - len(rest))
        causal = kwargs.get("causal", True)
        scale = kwargs.get("scale", 32 ** -0.5)
        pattern = [SMALL["sink_tokens"], SMALL["local_blocks"], SMALL["block_size"]]
        for dlse in (torch.randn_like(lse), None):
            opcheck(ops.attention_backward.default,
                    (torch.randn_like(out), dlse, q, k, v, out, lse, *rest, causal, scale, kind, use_sparse,
                     *pattern))


def test_opcheck_decode(device):
    q = make(3, 4, 32, device=device)
    cache = make(3, 40, 2, 32, device=device)
    seqlens = torch.tensor([1, 40, 17], dtype=torch.int32, device=device)
    flags = torch.tensor([True, False, True], device=device)
    opcheck(ops.decode_attention.default, (q, cache, cache, seqlens), dict(use_sparse=flags, **SMALL))
    pages = make(12, 8, 2, 32, device=device)
    table = torch.randperm(12, device=device)[:9].view(3, 3).to(torch.int32)
    seqlens = torch.tensor([1, 24, 17], dtype=torch.int32, device=device)
    opcheck(ops.decode_attention.default, (q, pages, pages, seqlens), dict(block_table=table))
    q4 = make(3, 4, 4, 32, device=device)  # 4 new tokens per sequence: lse [B, Hq, Tq]
    opcheck(ops.decode_attention.default, (q4, pages, pages, seqlens), dict(block_table=table, use_sparse=flags,
                                                                          **SMALL))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "requires_grad"])
def test_opcheck_pool(device, grad):
    cu = torch.tensor([0, 5, 5, 30], dtype=torch.int32, device=device)
    opcheck(ops.pool_queries.default, (make(30, 2, 32, device=device, grad=grad), cu, 4))
    mask = torch.ones(2, 12, dtype=torch.bool, device=device)
    mask[0, :3] = False
    opcheck(ops.pool_queries.default, (make(2, 12, 2, 32, device=device, grad=grad),),
            dict(pool_size=4, attention_mask=mask))
    opcheck(ops.pool_queries_backward.default, (make(3, 32, device=device), make(30, 2, 32, device=device), cu, 4,
                                                None))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "requires_grad"])
def test_opcheck_gumbel(device, grad):
    # Logit gaps of 100 dwarf the Gumbel noise (within [-3.2, 23] given the 1e-10 guards), so the
    # repeated calls opcheck makes agree although each draws fresh noise.
    logits = torch.tensor([[50.0, -50.0], [-50.0, 50.0], [60.0, -40.0]], device=device).requires_grad_(grad)
    opcheck(ops.gumbel_route.default, (logits, 1.0, True))
    opcheck(ops.gumbel_route.default, (logits, 0.7, False))
    for hard in (True, False):
        opcheck(ops.gumbel_route_sample.default, (logits.detach(), 0.7, hard))
    soft = torch.softmax(torch.randn(3, 2, device=device), dim=-1)
    opcheck(ops.gumbel_route_backward.default, (torch.randn(3, device=device), soft, 0.7))


def test_opcheck_model_ops(device):
    """The fused model ops have no backward: opcheck on inputs that do not require grad."""
    for dtype in (FP32, BF16):
        x = make(3, 5, 64, device=device, dtype=dtype)
        opcheck(ops.rms_norm.default, (x, make(64, device=device, dtype=dtype), 1e-5))
        opcheck(ops.silu_mul.default, (x, make(3, 5, 64, device=device, dtype=dtype)))
        q = make(2, 7, 4, 32, device=device, dtype=dtype).transpose(1, 2)
        k = make(2, 7, 2, 32, device=device, dtype=dtype).transpose(1, 2)
        cos = make(1, 7, 32, device=device, dtype=dtype)
        opcheck(ops.rotary_embedding.default, (q, k, cos, make(1, 7, 32, device=device, dtype=dtype)))
        w = make(24, 64, device=device, dtype=dtype)
        opcheck(ops.decode_linear.default, (x[:2, :1], w, make(24, device=device, dtype=dtype)))
        opcheck(ops.decode_swiglu.default, (x[:, :1], w, make(24, 64, device=device, dtype=dtype)))


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------

def model(q, k, v, qv, kv, vv, cu, flags, max_len):
    o1, l1 = fa.full_attention(q, k, v, causal=True)
    o2, l2 = fa.sparse_attention(q, k, v, **SMALL)
    o3, l3 = fa.flux_attention(qv, kv, vv, flags, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                               max_seqlen_k=max_len, **SMALL)
    pooled = fa.pool_queries(qv, cu, 4)
    loss = (o1.float() * 1.5).sum() + (o2.float() ** 2).sum() + l1.sum() + 0.5 * l2.sum() + \
        (o3.float() ** 2).sum() + l3.sum() + pooled.float().pow(2).sum()
    return loss, (o1, o2, o3, pooled)


def compile_inputs(device, dtype, seqlen, lengths):
    total = sum(lengths)
    tensors = [make(2, seqlen, 4, 32, device=device, dtype=dtype), make(2, seqlen, 2, 32, device=device, dtype=dtype),
               make(2, seqlen, 2, 32, device=device, dtype=dtype), make(total, 4, 32, device=device, dtype=dtype),
               make(total, 2, 32, device=device, dtype=dtype), make(total, 2, 32, device=device, dtype=dtype)]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    flags = torch.tensor([i % 2 == 0 for i in range(len(lengths))], device=device)
    return tensors, cu, flags, max(lengths)


def run_model(fn, tensors, cu, flags, max_len):
    leaves = [t.detach().requires_grad_() for t in tensors]
    loss, outs = fn(*leaves, cu, flags, max_len)
    grads = torch.autograd.grad(loss, leaves)
    return loss, outs, grads


def compare(eager, compiled):
    for a, b in zip([eager[0], *eager[1], *eager[2]], [compiled[0], *compiled[1], *compiled[2]]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    compiled_fn = torch.compile(model, fullgraph=True, backend=backend)
    # The second call changes every length: the ops must trace with symbolic sizes (SymInt
    # max_seqlen) instead of failing or silently reusing the first graph's shapes.
    for seqlen, lengths in ((48, [20, 0, 33]), (70, [9, 41, 5])):
        inputs = compile_inputs(device, FP32, seqlen, lengths)
        compare(run_model(model, *inputs), run_model(compiled_fn, *inputs))
