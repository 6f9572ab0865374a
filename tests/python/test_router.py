"""The Layer Router (configuration, architecture, FA-biased start, gate) and router checkpoints:
our safetensors format and checkpoints written with the reference implementation's key names."""

import math

import pytest
import torch
from safetensors.torch import save_file
from test_hf import flux_copy, make_mixed, padded, positions, tiny_model
from transformers import LlamaForCausalLM

import flux_attention as fa
from flux_attention import hf
from flux_attention.router import FA_BIAS, LayerRouter, RouterConfig


# Tiny models: extra threads only add contention on a shared machine (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# RouterConfig


@pytest.mark.parametrize("field,value", [
    ("pool_size", 0), ("pool_size", 1.5), ("sink_tokens", -128), ("sink_tokens", 100),
    ("local_blocks", 0), ("block_size", 0), ("tau_max", 0.5), ("tau_min", 0.0),
    ("tau_min", float("nan")), ("anneal_fraction", 0.0), ("anneal_fraction", 1.5),
    ("force", "dense"), ("force_sparse_layers", {-1}), ("force_sparse_layers", "0"),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"RouterConfig\.{field}"):
        RouterConfig(**{field: value})


def test_config_defaults_and_round_trip():
    c = RouterConfig()
    assert (c.pool_size, c.sink_tokens, c.local_blocks, c.block_size) == (150, 128, 16, 128)
    assert c.window_tokens == 2048 and c.force is None and c.force_sparse_layers == frozenset()
    d = RouterConfig(force="sa", force_sparse_layers=[3, 1], sink_tokens=256)
    assert RouterConfig.from_dict(d.to_dict()) == d
    with pytest.raises(ValueError, match="unknown field"):
        RouterConfig.from_dict({"pool": 3})


def test_temperature_schedule():
    c = RouterConfig()  # 1.5 -> 1.0 over ceil(0.6 * 300) = 180 steps
    assert c.temperature(0, 300) == pytest.approx(1.5)
    assert c.temperature(90, 300) == pytest.approx(1.25)
    assert c.temperature(180, 300) == 1.0 and c.temperature(299, 300) == 1.0
    taus = [c.temperature(t, 300) for t in range(300)]
    assert all(a >= b for a, b in zip(taus, taus[1:]))
    with pytest.raises(ValueError, match="total_steps"):
        c.temperature(0, 0)


# ---------------------------------------------------------------------------------------------
# LayerRouter


def test_architecture_and_parameter_count():
    r = LayerRouter(128)
    assert sum(p.numel() for p in r.parameters()) == 592_002
    shapes = [tuple(m.weight.shape) for m in r.modules() if isinstance(m, torch.nn.Linear)]
    assert shapes == [(1024, 128), (256, 1024), (512, 256), (128, 512), (2, 128)]
    with pytest.raises(ValueError, match="head_dim"):
        LayerRouter(0)


def test_fa_biased_initialisation():
    r = LayerRouter(64).eval()
    pooled = torch.randn(16, 64) * 5
    logits = r(pooled)
    assert torch.equal(logits, torch.tensor([[0.0, FA_BIAS]]).expand(16, 2))
    assert torch.softmax(logits, -1)[0, 1].item() == pytest.approx(1 / (1 + math.exp(-4.5)))
    assert torch.equal(r.gate(logits), torch.ones(16))
    r.train()
    r.tau = 1.0
    z = r.gate(r(torch.randn(4000, 64)))
    assert 0.97 < z.mean().item() < 1.0  # P(FA) = 0.989 under Gumbel noise


def test_eval_gate_is_argmax_with_ties_to_sparse():
    r = LayerRouter(16).eval()
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    assert r.gate(logits).tolist() == [1.0, 0.0, 0.0]


def test_training_gate_gradient_reaches_every_parameter():
    r = LayerRouter(32)
    with torch.no_grad():  # leave the saturated FA start so the soft gradient is not tiny
        r.cls_router_head_agnostic[-1].weight.normal_()
    r.train()
    r.tau = 1.2
    q = torch.randn(2, 50, 4, 32)
    z = r.gate(r(r.pool(q)))
    assert set(z.tolist()) <= {0.0, 1.0}
    (z * torch.tensor([1.0, -2.0])).sum().backward()
    for name, p in r.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_pooling_ignores_padding():
    r = LayerRouter(16)
    q = torch.randn(3, 40, 4, 16)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, :15] = False
    mask[2, 25:] = False
    padded = r.pool(q, attention_mask=mask)
    alone = torch.stack([r.pool(q[0:1])[0], r.pool(q[1:2, 15:])[0], r.pool(q[2:3, :25])[0]])
    assert torch.allclose(padded, alone, atol=1e-6)
    cu = torch.tensor([0, 40, 65, 90], dtype=torch.int32)
    varlen = r.pool(torch.cat([q[0], q[1, 15:], q[2, :25]]), cu_seqlens=cu)
    assert torch.allclose(varlen, alone, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# checkpoints


def _mixed_model(seed_lengths=(90, 64, 120, 33)):
    ref = tiny_model("llama")
    model = flux_copy(ref, fa.RouterConfig(block_size=16, sink_tokens=16, local_blocks=2))
    ids, mask = padded(list(seed_lengths), side="left")
    make_mixed(model, ids, mask)
    return ref, model, ids, mask


def _decisions(model, ids, mask):
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
    return fa.routing_report(model).use_sparse


def test_save_load_round_trip(tmp_path):
    ref, model, ids, mask = _mixed_model()
    g = torch.Generator().manual_seed(3)
    for r in hf.routers(model).values():  # a calibrated input normalisation travels too
        r.set_feature_normalization(1e-3 * torch.randn(r.head_dim, generator=g),
                                    1 + 1e-3 * torch.rand(r.head_dim, generator=g))
    want = _decisions(model, ids, mask)
    assert want.any() and not want.all()
    path = tmp_path / "router.safetensors"
    fa.save_router(model, str(path))

    fresh = tiny_model("llama")
    fresh.load_state_dict(ref.state_dict())
    result = fa.load_router(fresh, str(path))  # attaches with the stored config
    assert result.loaded == 24 and result.skipped == [] and result.ignored == 0  # 2 x (10 + 2)
    assert result.config == hf.routers(model)[0].config
    assert hf.routers(fresh)[0].config == result.config
    for (i, a), (j, b) in zip(hf.routers(model).items(), hf.routers(fresh).items()):
        assert i == j
        for (na, pa), (nb, pb) in zip(list(a.named_parameters()) + list(a.named_buffers()),
                                      list(b.named_parameters()) + list(b.named_buffers())):
            assert na == nb and torch.equal(pa, pb)
        assert not torch.equal(b.feature_scale, torch.ones_like(b.feature_scale))
    assert torch.equal(_decisions(fresh, ids, mask), want)


def test_reference_format_checkpoint_loads(tmp_path):
    """A checkpoint written with the reference's names: the routers' tensors, its Lagrange
    multipliers, the unused log_temp buffer and a base-model weight (a whole-model save)."""
    ref, model, ids, mask = _mixed_model()
    want = _decisions(model, ids, mask)
    tensors = {}
    for i, r in hf.routers(model).items():
        p = f"model.layers.{i}.self_attn.mask_allocator."
        for j in (0, 2):
            tensors[p + f"cls_feat_extractor.{j}.weight"] = r.cls_feat_extractor[j].weight.detach().clone()
            tensors[p + f"cls_feat_extractor.{j}.bias"] = r.cls_feat_extractor[j].bias.detach().clone()
        for j in (0, 2, 4):
            tensors[p + f"cls_router_head_agnostic.{j}.weight"] = r.cls_router_head_agnostic[j].weight.detach().clone()
            tensors[p + f"cls_router_head_agnostic.{j}.bias"] = r.cls_router_head_agnostic[j].bias.detach().clone()
        tensors[p + "log_temp"] = torch.zeros(1)
    tensors["model.sparsity_lambda1_task"] = torch.rand(5)
    tensors["model.sparsity_lambda2_task"] = torch.rand(5)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.randn(64, 64)
    # bf16 as the reference trains: loading casts to the router's fp32.
    tensors = {k: v.to(torch.bfloat16) if "mask_allocator" in k and "log_temp" not in k else v
               for k, v in tensors.items()}
    shard = tmp_path / "ref"
    shard.mkdir()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:9]}, str(shard / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[9:]}, str(shard / "model-00002-of-00002.safetensors"))
    # Round the source model's routers to bf16 too, so both sides hold the same values.
    with torch.no_grad():
        for r in hf.routers(model).values():
            for p in r.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    want = _decisions(model, ids, mask)

    fresh = tiny_model("llama")
    fresh.load_state_dict(ref.state_dict())
    fa.attach_router(fresh, fa.RouterConfig(block_size=16, sink_tokens=16, local_blocks=2))
    for r in hf.routers(fresh).values():  # left over from a calibration: must not survive the load
        r.set_feature_normalization(torch.full((r.head_dim,), 0.5), torch.full((r.head_dim,), 3.0))
    result = fa.load_router(fresh, str(shard))
    assert result.loaded == 20
    for r in hf.routers(fresh).values():
        assert torch.equal(r.feature_shift, torch.zeros(r.head_dim))
        assert torch.equal(r.feature_scale, torch.ones(r.head_dim))
    assert sorted(result.skipped) == sorted(["model.sparsity_lambda1_task", "model.sparsity_lambda2_task",
                                             "model.layers.0.self_attn.mask_allocator.log_temp",
                                             "model.layers.1.self_attn.mask_allocator.log_temp"])
    assert result.ignored == 1
    assert any("training-only" in n for n in result.notes)
    assert torch.equal(_decisions(fresh, ids, mask), want)
    assert hf.routers(fresh)[0].cls_feat_extractor[0].weight.dtype == torch.float32


def test_checkpoint_loads_across_model_prefixes(tmp_path):
    """Saved from LlamaForCausalLM (model.layers.*), loaded into the bare LlamaModel (layers.*)."""
    _, model, _, _ = _mixed_model()
    path = tmp_path / "r.safetensors"
    fa.save_router(model, str(path))
    base = tiny_model("llama").model
    result = fa.load_router(base, str(path))
    assert result.loaded == 24  # 2 layers x (10 parameters + 2 normalisation buffers)
    assert torch.equal(hf.routers(base)[1].cls_router_head_agnostic[4].bias,
                       hf.routers(model)[1].cls_router_head_agnostic[4].bias)
    assert isinstance(model, LlamaForCausalLM)


def test_checkpoint_errors(tmp_path):
    _, model, _, _ = _mixed_model()
    path = tmp_path / "r.safetensors"
    fa.save_router(model, str(path))
    # Fewer layers in the model than in the checkpoint.
    small = tiny_model("llama", num_hidden_layers=1)
    with pytest.raises(ValueError, match="layer 1"):
        fa.load_router(small, str(path))
    # A different head size.
    wide = tiny_model("llama", hidden_size=128, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"has shape \(128,\) in the checkpoint and \(256,\) in the model"):
        fa.load_router(wide, str(path))
    # A tensor missing.
    from safetensors.torch import load_file

    t = load_file(str(path))
    del t["model.layers.0.self_attn.mask_allocator.cls_router_head_agnostic.4.bias"]
    save_file(t, str(tmp_path / "partial.safetensors"))
    target = tiny_model("llama")
    with pytest.raises(ValueError, match=r"layer 0: missing cls_router_head_agnostic\.4\.bias"):
        fa.load_router(target, str(tmp_path / "partial.safetensors"))
    assert fa.load_router(target, str(tmp_path / "partial.safetensors"), strict=False).loaded == 23
    with pytest.raises(FileNotFoundError):
        fa.load_router(target, str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="no routers"):
        fa.save_router(tiny_model("llama"), str(tmp_path / "x.safetensors"))


# ---------------------------------------------------------------------------------------------
# spread_layers (forcing a share of the layers to SA)


@pytest.mark.parametrize("layers,fraction", [(32, 0.0), (32, 0.25), (32, 0.5), (32, 0.75), (32, 0.9),
                                             (32, 1.0), (8, 0.9), (7, 0.5), (1, 0.5), (1, 0.4)])
def test_spread_layers_counts_and_spacing(layers, fraction):
    got = sorted(fa.router.spread_layers(layers, fraction))
    assert len(got) == math.floor(fraction * layers + 0.5)
    assert all(0 <= i < layers for i in got) and len(set(got)) == len(got)
    if len(got) > 1:  # evenly spread: gaps differ by at most one layer
        gaps = [b - a for a, b in zip(got, got[1:])]
        assert max(gaps) - min(gaps) <= 1
    if len(got) == layers:
        assert got == list(range(layers))


def test_spread_layers_forces_exactly_those_layers():
    model = flux_copy(tiny_model("llama", num_hidden_layers=4),
                      RouterConfig(force="fa", force_sparse_layers=fa.router.spread_layers(4, 0.5)))
    ids, mask = padded([40, 25])
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions(mask))
    report = fa.routing_report(model)
    assert report.use_sparse.tolist() == [[False] * 2, [True] * 2, [False] * 2, [True] * 2]
    assert report.learned == [False] * 4


@pytest.mark.parametrize("args,match", [((0, 0.5), "num_layers"), ((4, 1.5), "fraction"),
                                        ((4, -0.1), "fraction"), ((True, 0.5), "num_layers")])
def test_spread_layers_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        fa.router.spread_layers(*args)


def test_calibrate_routers_standardises_the_pooled_queries():
    """shift / scale = mean / std of each router's pooled input over the calibration inputs; the
    router then feeds the MLP (pooled - shift) / scale."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    fa.attach_router(model, fa.RouterConfig(pool_size=8, block_size=16, sink_tokens=16, local_blocks=2))
    model.eval()
    seen = {i: [] for i in hf.routers(model)}
    for i, r in hf.routers(model).items():
        r.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach().double()))
    batches = [torch.randint(3, 250, (3, 40)), torch.randint(3, 250, (2, 40))]

    def run():
        for ids in batches:
            model(ids, use_cache=False)

    got = fa.calibrate_routers(model, run)
    for i, r in hf.routers(model).items():
        x = torch.cat(seen[i])
        assert x.shape[0] == 5
        assert torch.allclose(got[i][0].double(), x.mean(0), atol=1e-6)
        assert torch.allclose(got[i][1].double(), x.std(0, unbiased=False), rtol=1e-4, atol=1e-7)
        pooled = x[:2].float()
        z = (pooled - r.feature_shift) / r.feature_scale
        assert torch.allclose(r(pooled), r.cls_router_head_agnostic(r.cls_feat_extractor(z)))
        assert float(z.abs().max()) < 10  # standardised: O(1), where raw inputs differ by ~1 %

    with pytest.raises(ValueError, match="no routers"):
        fa.calibrate_routers(tiny_model("llama"), run)
    with pytest.raises(RuntimeError, match="did not reach the routers"):
        fa.calibrate_routers(model, lambda: None)
    # Layers whose branch the config fixes never pool: left as they are.
    forced = tiny_model("llama")
    fa.attach_router(forced, fa.RouterConfig(force="fa", block_size=16, sink_tokens=16, local_blocks=2))
    assert fa.calibrate_routers(forced, lambda: forced(batches[0], use_cache=False)) == {}
    some = tiny_model("llama")
    fa.attach_router(some, fa.RouterConfig(force_sparse_layers={1}, block_size=16, sink_tokens=16,
                                           local_blocks=2))
    assert sorted(fa.calibrate_routers(some, lambda: some(batches[0], use_cache=False))) == [0]
    assert torch.equal(hf.routers(some)[1].feature_scale, torch.ones(hf.routers(some)[1].head_dim))
    with pytest.raises(ValueError, match="scale finite and > 0"):
        hf.routers(model)[0].set_feature_normalization(torch.zeros(16), torch.zeros(16))
