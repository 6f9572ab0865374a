"""The fused model ops (rms_norm, silu_mul, rotary_embedding, decode_linear, decode_swiglu) against
float64 references written as transformers writes them, and fuse_ops on real transformers models."""

import pytest
import torch

import flux_attention as fa
from utils import assert_matches, device_params, randn

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


def dtypes_for(device):
    return [FP32, BF16, FP16] + ([FP64] if device == "cpu" else [])


# ---- references: transformers' code, run in the dtype asked for --------------------------------


def rms_norm_ref(x, w, eps, dtype=FP64):
    """LlamaRMSNorm.forward; dtype=FP64 is the truth, the input dtype is PyTorch's own error."""
    if dtype == FP64:
        x, w = x.double(), w.double()
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def silu_mul_ref(g, u, dtype=FP64):
    if dtype == FP64:
        g, u = g.double(), u.double()
    return torch.nn.functional.silu(g) * u


def rope_ref(q, k, cos, sin, dtype=FP64):
    """apply_rotary_pos_emb with rotate_half."""
    if dtype == FP64:
        q, k, cos, sin = q.double(), k.double(), cos.double(), sin.double()

    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + rot(q) * s, k * c + rot(k) * s


def poisoned_view(shape, dtype, device, pad):
    """A random tensor of `shape` whose rows sit inside a wider NaN-filled buffer (last dim padded
    by `pad`): a kernel that reads past a row, or ignores the row stride, returns NaN."""
    base = torch.full((*shape[:-1], shape[-1] + pad), float("nan"), dtype=dtype, device=device)
    view = base[..., : shape[-1]]
    view.copy_(randn(*shape, dtype=dtype, device=device))
    return view


# ---- rms_norm -------------------------------------------------------------------------------------

# On CUDA: a block per row up to 64 rows (decode), a warp per row from 65 rows for rows of 33-512
# 16-byte chunks ((70, 1024)), 8 threads per row for short rows.
NORM_SHAPES = [(4096,), (3, 7, 576), (5, 4096), (2, 3, 5, 128), (4, 13), (1, 1), (17, 1000), (70, 1024)]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_matches_reference(device, shape):
    for dtype in dtypes_for(device):
        x = randn(*shape, dtype=dtype, device=device) * 3
        w = (1 + 0.5 * torch.randn(shape[-1], device=device)).to(dtype)
        out = fa.rms_norm(x, w, 1e-5)
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
        assert_matches(f"rms_norm {shape} {dtype}", out, rms_norm_ref(x, w, 1e-5),
                       lambda: rms_norm_ref(x, w, 1e-5, dtype), dtype)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("pad", [8, 3])  # 16-byte aligned rows (vector path) and not
def test_rms_norm_strided_rows(device, pad):
    for dtype in (BF16, FP32):
        x = poisoned_view((6, 9, 256), dtype, device, pad)
        w = randn(256, dtype=dtype, device=device)
        out = fa.rms_norm(x, w, 1e-6)
        assert_matches("rms_norm strided", out, rms_norm_ref(x, w, 1e-6),
                       lambda: rms_norm_ref(x, w, 1e-6, dtype), dtype)


# ---- silu_mul ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("shape", [(14336,), (3, 5, 1536), (7,), (1001,), (2, 0, 8)],
                         ids=lambda s: "x".join(map(str, s)))
def test_silu_mul_matches_reference(device, shape):
    for dtype in dtypes_for(device):
        g = randn(*shape, dtype=dtype, device=device) * 4
        u = randn(*shape, dtype=dtype, device=device)
        out = fa.silu_mul(g, u)
        assert out.dtype == dtype and out.shape == g.shape
        assert_matches(f"silu_mul {shape} {dtype}", out, silu_mul_ref(g, u), lambda: silu_mul_ref(g, u, dtype),
                       dtype)


@pytest.mark.parametrize("device", device_params())
def test_silu_mul_misaligned_input(device):
    buf = randn(4 * 1024 + 1, dtype=BF16, device=device)
    g, u = buf[1:2049], buf[2049:]  # 2-byte offsets: the element-wise path
    assert_matches("silu_mul misaligned", fa.silu_mul(g, u), silu_mul_ref(g, u), lambda: silu_mul_ref(g, u, BF16),
                   BF16)


# ---- rotary_embedding ----------------------------------------------------------------------------


def hf_layout(batch, heads, seqlen, head_dim, dtype, device):
    """q as transformers hands it: a [B, H, S, D] view of a [B, S, H, D] projection."""
    return randn(batch, seqlen, heads, head_dim, dtype=dtype, device=device).transpose(1, 2)


def rope_inputs(batch, seqlen, head_dim, dtype, device, shared):
    pos = torch.arange(seqlen, dtype=torch.float64, device=device)
    inv = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    freqs = torch.outer(pos + 37, inv)
    emb = torch.cat((freqs, freqs), -1)[None].expand(1 if shared else batch, -1, -1)
    return emb.cos().to(dtype).contiguous(), emb.sin().to(dtype).contiguous()


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("b,hq,hk,s,d,shared", [
    (1, 32, 8, 67, 128, True), (2, 9, 3, 33, 64, False), (3, 4, 4, 5, 6, False), (1, 2, 1, 1, 16, True),
    (2, 4, 2, 150, 64, False)])  # CUDA: under 256 positions blocks split a position's heads; from 256 not
def test_rotary_embedding_matches_reference(device, b, hq, hk, s, d, shared):
    for dtype in dtypes_for(device):
        q = hf_layout(b, hq, s, d, dtype, device)
        k = hf_layout(b, hk, s, d, dtype, device)
        cos, sin = rope_inputs(b, s, d, dtype, device, shared)
        qo, ko = fa.rotary_embedding(q, k, cos, sin)
        assert qo.stride() == q.stride() and ko.stride() == k.stride(), "outputs keep the inputs' layout"
        want_q, want_k = rope_ref(q, k, cos, sin)
        low = lambda: rope_ref(q, k, cos, sin, dtype)  # noqa: E731
        assert_matches(f"rope q {dtype}", qo, want_q, lambda: low()[0], dtype)
        assert_matches(f"rope k {dtype}", ko, want_k, lambda: low()[1], dtype)


@pytest.mark.parametrize("device", device_params())
def test_rotary_embedding_contiguous_and_strided(device):
    """Contiguous [B, H, S, D] inputs, and k as a slice of a NaN-padded buffer."""
    q = randn(2, 4, 9, 64, dtype=BF16, device=device)
    k = poisoned_view((2, 2, 9, 64), BF16, device, 5)
    cos, sin = rope_inputs(2, 9, 64, BF16, device, shared=False)
    qo, ko = fa.rotary_embedding(q, k, cos, sin)
    want_q, want_k = rope_ref(q, k, cos, sin)
    assert_matches("rope contiguous q", qo, want_q, lambda: rope_ref(q, k, cos, sin, BF16)[0], BF16)
    assert_matches("rope strided k", ko, want_k, lambda: rope_ref(q, k, cos, sin, BF16)[1], BF16)


# ---- decode_linear / decode_swiglu --------------------------------------------------------------------


def linear_ref(x, w, b=None, dtype=FP64):
    if dtype == FP64:
        x, w, b = x.double(), w.double(), None if b is None else b.double()
    return torch.nn.functional.linear(x, w, b)


def swiglu_ref(x, wg, wu, dtype=FP64):
    if dtype == FP64:
        x, wg, wu = x.double(), wg.double(), wu.double()
    return torch.nn.functional.silu(torch.nn.functional.linear(x, wg)) * torch.nn.functional.linear(x, wu)


# (leading shape of x, in_features, out_features): 1-8 token rows; in_features a multiple of 8
# (16-byte path) or not (element path); out_features not a multiple of the block's 4 features.
# On CUDA, 2-8 rows with in_features % 32 == 0 take the tensor-core kernel: 8 warps per block from
# 2048 features (2049: a partial last block; k 160 leaves warps with no k step), 16 warps below
# (k 2080: the warps' step counts differ).
LINEAR_CASES = [((1,), 64, 33), ((3,), 1000, 70), ((2, 1), 4096, 1030), ((6,), 160, 2049), ((8,), 136, 5),
                ((5,), 1001, 18), ((4, 1, 1), 512, 4), ((7,), 2080, 100)]
SWIGLU_CASES = LINEAR_CASES[:4] + LINEAR_CASES[-1:]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("lead,k,n", LINEAR_CASES, ids=lambda c: str(c))
def test_decode_linear_matches_reference(device, lead, k, n):
    for dtype in dtypes_for(device):
        x = randn(*lead, k, dtype=dtype, device=device)
        w = randn(n, k, dtype=dtype, device=device) / k ** 0.5
        for b in (None, randn(n, dtype=dtype, device=device)):
            out = fa.decode_linear(x, w, b)
            assert out.shape == (*lead, n) and out.dtype == dtype and out.is_contiguous()
            assert_matches(f"decode_linear {lead} {k}x{n} {dtype} bias={b is not None}", out,
                           linear_ref(x, w, b), lambda: linear_ref(x, w, b, dtype), dtype)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("lead,k,n", SWIGLU_CASES, ids=lambda c: str(c))
def test_decode_swiglu_matches_reference(device, lead, k, n):
    for dtype in dtypes_for(device):
        x = randn(*lead, k, dtype=dtype, device=device)
        wg = randn(n, k, dtype=dtype, device=device) * (3 / k ** 0.5)
        wu = randn(n, k, dtype=dtype, device=device) / k ** 0.5
        out = fa.decode_swiglu(x, wg, wu)
        assert out.shape == (*lead, n) and out.dtype == dtype
        assert_matches(f"decode_swiglu {lead} {k}x{n} {dtype}", out, swiglu_ref(x, wg, wu),
                       lambda: swiglu_ref(x, wg, wu, dtype), dtype)


# (leading shape of x, in_features, out_features of each member): the q/k/v shape of GQA (4:1:1, a
# member under one 16-feature block), out_features off the 16-feature block, one and two members,
# in_features that the tensor-core kernel does not take (1000) so the group runs member by member.
GROUP_CASES = [((1,), 256, (128, 32, 32)), ((3, 1), 512, (70, 18, 5)), ((8,), 160, (33,)),
               ((5,), 1000, (64, 16, 16)), ((2,), 4096, (1030, 260))]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("lead,k,ns", GROUP_CASES, ids=lambda c: str(c))
def test_decode_linear_group_matches_reference(device, lead, k, ns):
    for dtype in dtypes_for(device):
        x = randn(*lead, k, dtype=dtype, device=device)
        ws = [randn(n, k, dtype=dtype, device=device) / k ** 0.5 for n in ns]
        bias_sets = [None, [randn(n, dtype=dtype, device=device) if i != 1 else None for i, n in enumerate(ns)]]
        for bs in bias_sets:
            outs = fa.decode_linear_group(x, ws, bs)
            assert len(outs) == len(ns)
            for i, (out, w) in enumerate(zip(outs, ws)):
                b = None if bs is None else bs[i]
                assert out.shape == (*lead, w.shape[0]) and out.dtype == dtype and out.is_contiguous()
                assert_matches(f"decode_linear_group {lead} {k}x{ns}[{i}] {dtype} bias={b is not None}", out,
                               linear_ref(x, w, b), lambda: linear_ref(x, w, b, dtype), dtype)
                if device != "cpu":  # one launch or three: the same sums in the same order
                    assert torch.equal(out, fa.decode_linear(x, w, b)), f"group member {i} != decode_linear"
        # x with a non-unit last stride is copied by the op: every member must read the same copy.
        xc = randn(k, 3, dtype=dtype, device=device).t()
        for out, w in zip(fa.decode_linear_group(xc, ws), ws):
            assert_matches(f"decode_linear_group column-major x {k}x{ns} {dtype}", out, linear_ref(xc, w),
                           lambda: linear_ref(xc, w, None, dtype), dtype)


def test_decode_linear_group_errors_and_meta():
    x = torch.randn(2, 8)
    w = torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="decode_linear_group: weights must hold 1 to 3 matrices"):
        fa.decode_linear_group(x, [w] * 4)
    with pytest.raises(RuntimeError, match="decode_linear_group: weights must hold 1 to 3"):
        fa.decode_linear_group(x, [])
    with pytest.raises(RuntimeError, match=r"decode_linear_group: weights\[1\] must be \[out_features, 8\]"):
        fa.decode_linear_group(x, [w, torch.randn(5, 7)])
    with pytest.raises(RuntimeError, match="decode_linear_group: biases must be empty or hold one entry"):
        fa.decode_linear_group(x, [w, w], [None])
    with pytest.raises(RuntimeError, match=r"decode_linear_group: biases\[0\] must be \[5\]"):
        fa.decode_linear_group(x, [w], [torch.randn(4)])
    with pytest.raises(RuntimeError, match=r"decode_linear_group: weights\[0\] must have the dtype of x"):
        fa.decode_linear_group(x, [w.double()])
    with pytest.raises(RuntimeError, match="decode_linear_group: an input requires grad"):
        fa.decode_linear_group(x, [w.requires_grad_()])
    m = torch.empty(2, 1, 64, device="meta", dtype=BF16)
    outs = fa.decode_linear_group(m, [torch.empty(n, 64, device="meta", dtype=BF16) for n in (96, 32)])
    assert [o.shape for o in outs] == [(2, 1, 96), (2, 1, 32)]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("pad", [8, 3])  # 16-byte aligned rows and not
def test_decode_linear_strided_operands(device, pad):
    """x rows and weight rows inside NaN-padded buffers (a kernel that ignores a row stride or reads
    past a row returns NaN); the up weight with strides other than the gate's (copied)."""
    for dtype in (BF16, FP32):
        x = poisoned_view((4, 256), dtype, device, pad)
        w = poisoned_view((40, 256), dtype, device, pad)
        b = randn(40, dtype=dtype, device=device)
        assert_matches("decode_linear strided", fa.decode_linear(x, w, b), linear_ref(x, w, b),
                       lambda: linear_ref(x, w, b, dtype), dtype)
        wu = randn(40, 256, dtype=dtype, device=device)
        assert_matches("decode_swiglu strided", fa.decode_swiglu(x, w, wu), swiglu_ref(x, w, wu),
                       lambda: swiglu_ref(x, w, wu, dtype), dtype)
        wt = randn(256, 40, dtype=dtype, device=device).t()  # column-major weight: copied to rows
        assert_matches("decode_linear transposed weight", fa.decode_linear(x, wt), linear_ref(x, wt),
                       lambda: linear_ref(x, wt, None, dtype), dtype)


@pytest.mark.parametrize("device", device_params())
def test_decode_linear_empty_shapes(device):
    x = randn(3, 0, dtype=FP32, device=device)
    b = randn(6, dtype=FP32, device=device)
    assert torch.equal(fa.decode_linear(x, torch.empty(6, 0, device=device), b), b.expand(3, 6))
    assert torch.equal(fa.decode_swiglu(x, torch.empty(6, 0, device=device), torch.empty(6, 0, device=device)),
                       torch.zeros(3, 6, device=device))
    assert fa.decode_linear(randn(0, 8, dtype=FP32, device=device), torch.ones(6, 8, device=device)).shape == (0, 6)
    assert fa.decode_linear(randn(2, 8, dtype=FP32, device=device), torch.ones(0, 8, device=device)).shape == (2, 0)


# ---- errors -------------------------------------------------------------------------------------------


def test_model_op_errors_name_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"rms_norm: weight must be \[8\]"):
        fa.rms_norm(x, torch.ones(7))
    with pytest.raises(RuntimeError, match="rms_norm: weight must have the dtype of x"):
        fa.rms_norm(x, torch.ones(8, dtype=FP64))
    with pytest.raises(RuntimeError, match="rms_norm: eps must be finite"):
        fa.rms_norm(x, torch.ones(8), float("nan"))
    with pytest.raises(RuntimeError, match="rms_norm: x must be bf16, fp16, fp32"):
        fa.rms_norm(x.to(torch.int32), torch.ones(8, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="silu_mul: up must have gate's shape"):
        fa.silu_mul(x, torch.randn(4, 9))
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos = torch.randn(1, 3, 8)
    with pytest.raises(RuntimeError, match=r"rotary_embedding: cos must be \[batch or 1, seqlen, head_dim\]"):
        fa.rotary_embedding(q, k, cos[:, :2], cos[:, :2])
    with pytest.raises(RuntimeError, match="rotary_embedding: head_dim must be even"):
        fa.rotary_embedding(q[..., :7], k[..., :7], cos[..., :7], cos[..., :7])
    with pytest.raises(RuntimeError, match="rotary_embedding: k must match q's batch"):
        fa.rotary_embedding(q, k[:, :, :2], cos, cos)
    with pytest.raises(RuntimeError, match="rotary_embedding: sin must have cos's shape"):
        fa.rotary_embedding(q, k, cos, cos[:1, :1])
    w = torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="decode_linear: x has 9 token rows .* at most 8"):
        fa.decode_linear(torch.randn(3, 3, 8), w)
    with pytest.raises(RuntimeError, match=r"decode_linear: weight must be \[out_features, 8\]"):
        fa.decode_linear(x, torch.randn(5, 7))
    with pytest.raises(RuntimeError, match=r"decode_linear: bias must be \[5\]"):
        fa.decode_linear(x, w, torch.randn(4))
    with pytest.raises(RuntimeError, match="decode_linear: weight must have the dtype of x"):
        fa.decode_linear(x, w.double())
    with pytest.raises(RuntimeError, match="decode_swiglu: up_weight must have gate_weight's shape"):
        fa.decode_swiglu(x, w, torch.randn(6, 8))


def test_model_ops_refuse_grad_and_run_without_it():
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.ones(16)
    with pytest.raises(RuntimeError, match="rms_norm: an input requires grad, but this inference kernel"):
        fa.rms_norm(x, w)
    with pytest.raises(RuntimeError, match="silu_mul: an input requires grad"):
        fa.silu_mul(x, x)
    with torch.no_grad():
        assert not fa.rms_norm(x, w).requires_grad
    with torch.inference_mode():
        fa.silu_mul(x.detach(), x.detach())
    with pytest.raises(RuntimeError, match="decode_linear: an input requires grad"):
        fa.decode_linear(x, torch.ones(4, 16))
    with pytest.raises(RuntimeError, match="decode_swiglu: an input requires grad"):
        fa.decode_swiglu(x.detach(), torch.ones(4, 16, requires_grad=True), torch.ones(4, 16))


def test_model_ops_meta_shapes():
    x = torch.empty(2, 5, 64, device="meta", dtype=BF16)
    assert fa.rms_norm(x, torch.empty(64, device="meta", dtype=BF16)).shape == x.shape
    assert fa.silu_mul(x, x).shape == x.shape
    q = torch.empty(2, 5, 4, 64, device="meta", dtype=BF16).transpose(1, 2)
    cos = torch.empty(2, 5, 64, device="meta", dtype=BF16)
    qo, ko = fa.rotary_embedding(q, q, cos, cos)
    assert qo.shape == q.shape and ko.shape == q.shape
    w = torch.empty(96, 64, device="meta", dtype=BF16)
    assert fa.decode_linear(x[:, :1], w).shape == (2, 1, 96)
    assert fa.decode_swiglu(x[:, :1], w, w).shape == (2, 1, 96)


# ---- fuse_ops on transformers models ----------------------------------------------------------------


def tiny_model(kind, device, dtype):
    import transformers

    fa.register()
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, attn_implementation="sdpa")
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen3Config(**common, head_dim=32)
        cls = transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    model = cls(config).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # non-trivial norm weights, so a norm that ignores them fails
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("kind,route", [("llama", None), ("qwen3", None), ("llama", "fa"), ("llama", "sa")],
                         ids=["llama-sdpa", "qwen3-sdpa", "llama-flux-fa", "llama-flux-sa"])
def test_fuse_ops_keeps_the_model_output(device, kind, route):
    """Logits of the fused model against the unfused one: fp32 on the CPU within 1e-5; bf16 on
    CUDA within the 2x rule against the fp32 model, with the unfused bf16 model as PyTorch's own
    error."""
    import copy

    from utils import assert_within_2x

    dtype = FP32 if device == "cpu" else BF16
    model = tiny_model(kind, device, dtype)
    if route is not None:
        fa.attach_router(model, fa.RouterConfig(force=route, sink_tokens=8, local_blocks=2, block_size=8))
        model.eval()
    modeling = __import__(f"transformers.models.{kind}.modeling_{kind}", fromlist=["x"])
    original_rope = modeling.apply_rotary_pos_emb
    ids = torch.randint(0, 512, (2, 37), device=device)
    with torch.no_grad():
        truth = copy.deepcopy(model).float()(ids).logits.float() if dtype != FP32 else None
        want = model(ids).logits.float()
        counts = fa.fuse_ops(model)
        n_norms = 2 * 3 + 1 + (2 * 3 if kind == "qwen3" else 0)  # 2 per layer + final (+ q/k norms)
        assert counts == {"rms_norm": n_norms, "mlp": 3, "rope": 1, "linear": 7 * 3 + 1, "qkv": 3}
        assert fa.fuse_ops(model) == {"rms_norm": 0, "mlp": 0, "rope": 0, "linear": 0, "qkv": 0}, "idempotent"
        assert modeling.apply_rotary_pos_emb is not original_rope
        got = model(ids).logits.float()
    if dtype == FP32:
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 1e-5 * scale, (got - want).abs().max().item()
    else:
        assert_within_2x(f"fused {kind} {route}", got, truth, want)

    # Training-style forward: gradients flow through the original code, no error.
    model.model.embed_tokens.weight.requires_grad_(True)
    loss = model(ids).logits.float().square().mean()
    loss.backward()
    assert model.model.embed_tokens.weight.grad is not None

    fa.unfuse_ops(model)
    assert modeling.apply_rotary_pos_emb is original_rope
    assert all("forward" not in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits.float(), want)


def test_fuse_ops_ignores_other_models():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    assert fa.fuse_ops(model) == {"rms_norm": 0, "mlp": 0, "rope": 0, "linear": 0, "qkv": 0}
    fa.unfuse_ops(model)


def test_fused_rope_wrapper_falls_back_for_other_calls():
    """Calls the kernel does not cover (another unsqueeze_dim, grad) run transformers' code."""
    model = tiny_model("llama", "cpu", FP32)
    from transformers.models.llama import modeling_llama as m

    fa.fuse_ops(model)
    try:
        q = torch.randn(1, 5, 2, 8)  # [B, S, H, D] with unsqueeze_dim=2
        cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
        got = m.apply_rotary_pos_emb(q, q, cos, sin, unsqueeze_dim=2)
        want = m.apply_rotary_pos_emb._flux_original(q, q, cos, sin, unsqueeze_dim=2)
        assert torch.equal(got[0], want[0])
        qg = torch.randn(1, 2, 5, 8, requires_grad=True)
        out, _ = m.apply_rotary_pos_emb(qg, qg, cos, sin)
        assert out.grad_fn is not None
    finally:
        fa.unfuse_ops(model)


def test_fuse_ops_leaves_instance_wrapped_modules_alone():
    """A forward already replaced on the instance (accelerate's hooks do that) is neither fused nor
    removed by unfuse_ops."""
    import functools

    model = tiny_model("llama", "cpu", FP32)
    norm = model.model.norm
    wrapper = functools.partial(type(norm).forward, norm)
    norm.forward = wrapper
    counts = fa.fuse_ops(model)
    assert counts["rms_norm"] == 2 * 3 and norm.forward is wrapper
    fa.unfuse_ops(model)
    assert norm.forward is wrapper


@pytest.mark.parametrize("device", device_params(cpu=False))
@pytest.mark.parametrize("route", [None, "sa"], ids=["sdpa", "flux-sa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fuse_ops_decode_step_uses_the_decode_linears(device, route, batch, monkeypatch):
    """A decode step of the fused bf16 model at batch 1 and 3 (token rows): every linear and the
    SwiGLU run the decode kernels, and the logits meet the 2x rule against the fp32 model, with
    the unfused bf16 step as PyTorch's own error."""
    import copy

    from utils import assert_within_2x

    model = tiny_model("llama", device, BF16)
    if route is not None:
        fa.attach_router(model, fa.RouterConfig(force=route, sink_tokens=8, local_blocks=2, block_size=8))
        model.eval()
    truth_model = copy.deepcopy(model).float()
    ids = torch.randint(0, 512, (batch, 37), device=device)
    step = torch.randint(0, 512, (batch, 1), device=device)

    def decode(m):
        out = m(ids, use_cache=True)
        return m(step, past_key_values=out.past_key_values, use_cache=True).logits.float()

    calls = {"decode_linear": 0, "decode_swiglu": 0, "decode_linear_group": 0}
    for name in calls:
        real = getattr(fa.ops, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(fa.ops, name, counted)
    with torch.no_grad():
        truth, want = decode(truth_model), decode(model)
        assert calls == {"decode_linear": 0, "decode_swiglu": 0, "decode_linear_group": 0}
        fa.fuse_ops(model)
        got = decode(model)
    fa.unfuse_ops(model)
    # Prefill (37 rows per sequence) stays on cuBLAS; the decode step runs q/k/v as one group, o_proj and
    # down_proj of each layer and the lm_head as decode linears, and one SwiGLU per layer.
    assert calls == {"decode_linear": 3 * 2 + 1, "decode_swiglu": 3, "decode_linear_group": 3}, calls
    assert_within_2x(f"fused decode step {route}", got, truth, want)


def test_projection_group_returns_kept_outputs_only_for_the_same_input():
    """fuse_ops' q/k/v group: the first member computes all three; the others get the kept outputs
    for the very tensor the group read, once, and nothing for another tensor or after an in-place
    change (their own forward then computes)."""
    from flux_attention.fused import _ProjectionGroup

    torch.manual_seed(0)
    linears = [torch.nn.Linear(32, n, bias=(n == 8)) for n in (16, 8, 8)]
    group = _ProjectionGroup(linears)
    x = torch.randn(2, 32)
    with torch.no_grad():
        want = [m(x) for m in linears]
        q = group.compute(0, x)
        assert torch.allclose(q, want[0], atol=1e-5)
        assert group.take(2, torch.randn(2, 32)) is None, "another tensor"
        k = group.take(1, x)
        assert k is not None and torch.allclose(k, want[1], atol=1e-5)
        assert group.take(1, x) is None, "each kept output is taken once"
        v = group.take(2, x)
        assert v is not None and torch.allclose(v, want[2], atol=1e-5)
        assert group._x is None, "the input is released once both outputs are taken"
        # A member that runs first keeps the other two; an in-place change of x invalidates them.
        group.compute(1, x)
        x.add_(1.0)
        assert group.take(0, x) is None and group.take(2, x) is None
    # Under grad with weights that require it, the group does not compute (the module's own path does).
    assert group.compute(0, x) is None
