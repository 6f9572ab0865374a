"""FluxCache: per (layer, sequence) decisions, eviction of SA sequences down to sink + window,
the paged layout decode_attention reads, and its behaviour inside model.generate."""

import pytest
import torch
from test_hf import (
    SMALL,
    assert_logits,
    assert_rel,
    cache_kwargs,
    fp32_twin,
    flux_copy,
    make_mixed,
    padded,
    positions,
    streaming_mask4d,
    tiny_model,
)
from transformers import StoppingCriteria, StoppingCriteriaList

import flux_attention as fa
from flux_attention import hf
from flux_attention.cache import FluxCacheLayer, _ranges_minus


# Tiny models: extra threads only add contention on a shared machine (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


class Watch(StoppingCriteria):
    """Reads the cache after every generation step: the most tokens any layer held per sequence,
    and (optionally) poisons every page no sequence maps, so a read of one shows up as NaN."""

    def __init__(self, cache, poison=False):
        self.cache = cache
        self.poison = poison
        self.max_held = {}
        self.steps = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.steps += 1
        for i, layer in enumerate(self.cache.layers):
            if not layer.started:
                continue
            held = layer.tokens_held()
            prev = self.max_held.get(i, torch.zeros_like(held))
            self.max_held[i] = torch.maximum(prev, held)
            if self.poison:
                unmapped = torch.ones(layer.k_pages.shape[0], dtype=torch.bool)
                unmapped[layer.block_table_host.flatten().long()] = False
                unmapped[0] = True
                unmapped = unmapped.to(layer.k_pages.device)
                layer.k_pages[unmapped] = float("nan")
                layer.v_pages[unmapped] = float("nan")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def test_page_range_arithmetic():
    assert _ranges_minus([(0, 5)], [(1, 3)]) == [(0, 1), (3, 5)]
    assert _ranges_minus([(0, 1), (4, 6)], [(0, 1), (5, 7)]) == [(4, 5)]
    assert _ranges_minus([(2, 3)], []) == [(2, 3)]
    layer = FluxCacheLayer()
    layer.page_size, layer.sink_pages, layer.local_blocks = 16, 1, 2
    assert layer._mapped(0, True) == []
    assert layer._mapped(40, True) == [(0, 1), (1, 3)]  # 3 pages: everything still in the window
    assert layer._mapped(100, True) == [(0, 1), (5, 7)]  # 7 pages: sink + the last two
    assert layer._mapped(100, False) == [(0, 7)]


def test_prefill_append_paths_store_the_same_rows():
    """append_varlen writes a prompt into fresh (ascending, consecutive) pages with one copy per
    sequence, and anything else (pages handed out in another order) through per-row indices:
    both must put every row where the block table says."""
    torch.manual_seed(0)
    hkv, d, ps = 2, 8, 16
    layer = FluxCacheLayer()
    layer.lazy_initialization(torch.zeros(1), torch.zeros(1))
    layer.start(3, torch.zeros(3, dtype=torch.bool), block_size=ps, sink_tokens=ps, local_blocks=2,
                num_heads_k=hkv, head_dim=d)
    per_row = []
    general = layer.write
    layer.write = lambda *a: (per_row.append(1), general(*a))

    def append(counts):
        k, v = torch.randn(sum(counts), hkv, d), torch.randn(sum(counts), hkv, d)
        layer.append_varlen(k, v, torch.tensor([0] + counts).cumsum(0).to(torch.int32), counts)
        return list(torch.split(k, counts)), list(torch.split(v, counts))

    def check(parts):
        for b in range(3):
            ks = torch.cat([p[0][b] for p in parts])
            vs = torch.cat([p[1][b] for p in parts])
            pos = torch.arange(ks.shape[0])
            pages = layer.block_table_host[b, pos // ps].to(torch.int64)
            assert torch.equal(layer.k_pages[pages, pos % ps], ks)
            assert torch.equal(layer.v_pages[pages, pos % ps], vs)

    first = append([37, 16, 70])  # fresh pages: the copy path
    assert not per_row
    for b, n in enumerate([37, 16, 70]):
        pages = layer.block_table_host[b, :(n + ps - 1) // ps]
        assert bool((pages[1:] - pages[:-1] == 1).all()), "a prompt's pages are one ascending run"
    check([first])
    second = append([5, 16, 3])  # into partly filled pages (and one new page): still copies
    assert not per_row
    check([first, second])
    # Spare pages handed out in descending order: runs are not ascending, the per-row path.
    layer._grow(12, exact=True)
    layer._free[:layer._n_free] = layer._free[:layer._n_free].flip(0)
    third = append([5, 40, 20])
    assert per_row == [1]
    check([first, second, third])
    assert [int(x) for x in layer.cache_seqlens] == [47, 72, 93]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_sa_generation_holds_sink_plus_window_and_equals_sparse_attention(arch, device):
    """Forced SA with small blocks: after every step each layer holds at most sink + window
    tokens per sequence (bound from the issue: sink + window + one block), unmapped pages are
    NaN and never read, and the generated logits equal sparse_attention over the whole sequence
    (a no-cache forward) and SDPA under the explicit streaming mask."""
    ref = tiny_model(arch, device)
    model = flux_copy(ref, fa.RouterConfig(force="sa", **SMALL))
    ids, mask = (t.to(device) for t in padded([70, 41, 100], side="left"))
    n = 160
    cache = fa.FluxCache(model.config)
    watch = Watch(cache, poison=True)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             stopping_criteria=StoppingCriteriaList([watch]),
                             **cache_kwargs(model, cache))
    assert watch.steps == n
    bound = SMALL["sink_tokens"] + SMALL["local_blocks"] * SMALL["block_size"]
    for layer, held in watch.max_held.items():
        assert held.max() <= bound + SMALL["block_size"], (layer, held)
        assert held.max() <= bound, (layer, held)  # what eviction actually guarantees
    report = cache.memory_report()
    totals = [70 + n - 1, 41 + n - 1, 100 + n - 1]
    for entry in report["layers"]:
        assert entry["tokens_total"] == totals and entry["use_sparse"] == [True] * 3
        assert max(entry["tokens_held"]) <= bound
    assert report["saved_fraction"] > 0.6, report["saved_fraction"]

    seqs = out.sequences
    gen = torch.stack(out.logits, 1)
    assert torch.isfinite(gen).all()
    full = torch.cat([mask, torch.ones(3, n, dtype=torch.long, device=device)], 1)
    explicit_mask = streaming_mask4d(full.cpu(), **SMALL).to(device)
    kw = dict(position_ids=positions(full), use_cache=False)
    with torch.no_grad():
        whole = model(seqs, attention_mask=full, **kw).logits
        explicit = ref(seqs, attention_mask=explicit_mask, **kw).logits
    start = ids.shape[1] - 1
    steps = slice(start, start + n)
    every = torch.ones(3, n, dtype=torch.bool, device=device)
    if device == "cpu":
        assert_rel(whole[:, steps], gen, every)
        assert_rel(explicit[:, steps], gen, every)
    else:
        with torch.no_grad():
            truth = fp32_twin(ref)(seqs, attention_mask=explicit_mask, **kw).logits[:, steps]
        assert_logits("decode vs fp32 truth", gen, truth, every, explicit[:, steps], device)
        assert_logits("prefill vs fp32 truth", whole[:, steps], truth, every, explicit[:, steps], device)


def test_fa_sequences_keep_every_token():
    model = flux_copy(tiny_model("llama"), fa.RouterConfig(force="fa", **SMALL))
    ids, mask = padded([70, 41], side="left")
    cache = fa.FluxCache(model.config)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=40, min_new_tokens=40,
                       do_sample=False, **cache_kwargs(model, cache))
    for entry in cache.memory_report()["layers"]:
        assert entry["tokens_held"] == entry["tokens_total"] == [70 + 39, 41 + 39]
    assert cache.memory_report()["saved_fraction"] < 0.2  # only partly filled last pages


def test_mixed_batch_decisions_kept_and_pages_recycled():
    """Learned routing splits the batch; the cache stores each (layer, sequence) decision, SA
    sequences stay bounded while FA sequences grow, and decoding equals each sequence alone."""
    ref = tiny_model("llama")
    model = flux_copy(ref, fa.RouterConfig(**SMALL))
    lengths = [90, 64, 120, 33]
    ids, mask = padded(lengths, side="left")
    make_mixed(model, ids, mask)
    n = 100
    cache = fa.FluxCache(model.config)
    watch = Watch(cache)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, stopping_criteria=StoppingCriteriaList([watch]),
                             **cache_kwargs(model, cache))
    decisions = cache.decisions()
    report = fa.routing_report(model)
    assert [decisions[i] for i in range(2)] == report.use_sparse.tolist()
    bound = SMALL["sink_tokens"] + SMALL["local_blocks"] * SMALL["block_size"]
    for i, layer in enumerate(cache.layers):
        held = watch.max_held[i]
        for b, sparse in enumerate(decisions[i]):
            total = lengths[b] + n - 1
            assert total > bound
            assert held[b] <= bound if sparse else held[b] == total, (i, b, held[b], total)
        # Pages in use match what the sequences map (freed SA pages went back to the pool).
        mapped = int((layer.block_table_host != 0).sum())
        assert layer.pages_in_use() == mapped
    with torch.no_grad():
        for b, length in enumerate(lengths):
            alone = model.generate(ids[b:b + 1, -length:], max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, **cache_kwargs(model, fa.FluxCache(model.config)))
            assert torch.equal(alone[0], out[b, -(length + n):]), b
    # A DynamicCache (the generic path) reaches the same tokens.
    with torch.no_grad():
        dyn = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)
    assert torch.equal(dyn, out)


def test_decision_taken_once_at_prefill():
    """Changing the routers after the prefill does not change the decode: the decisions live in
    the cache."""
    ref = tiny_model("llama")
    model = flux_copy(ref, fa.RouterConfig(**SMALL))
    ids, mask = padded([90, 64, 120, 33], side="left")
    make_mixed(model, ids, mask)
    pos = positions(mask)
    cache = fa.FluxCache(model.config)
    kw = cache_kwargs(model, cache)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=pos, **kw)
        before = cache.decisions()
        step = torch.randint(3, 256, (4, 1))
        mask2 = torch.cat([mask, torch.ones(4, 1, dtype=torch.long)], 1)
        pos2 = pos[:, -1:] + 1
        a = model(step, attention_mask=mask2, position_ids=pos2, **kw).logits
        # Flip every router (FA <-> SA) and decode the same step on a copy of the state.
        cache2 = fa.FluxCache(model.config)
        kw2 = cache_kwargs(model, cache2)
        model(ids, attention_mask=mask, position_ids=pos, **kw2)
        for r in hf.routers(model).values():
            r.cls_router_head_agnostic[-1].weight.neg_()
            r.cls_router_head_agnostic[-1].bias.neg_()
        b = model(step, attention_mask=mask2, position_ids=pos2, **kw2).logits
        # The flipped routers do route differently, for a new prefill.
        model(ids, attention_mask=mask, position_ids=pos, use_cache=False)
        flipped = fa.routing_report(model).use_sparse.tolist()
    assert flipped != [before[0], before[1]]
    assert cache2.decisions() == before
    assert torch.equal(a, b)


@pytest.mark.parametrize("force", ["fa", "sa"])
def test_chunked_prefill_equals_one_prefill(force):
    model = flux_copy(tiny_model("qwen3"), fa.RouterConfig(force=force, **SMALL))
    ids, mask = padded([150, 97], side="left")
    pos = positions(mask)
    with torch.no_grad():
        one = model(ids, attention_mask=mask, position_ids=pos,
                    **cache_kwargs(model, fa.FluxCache(model.config))).logits
        cache = fa.FluxCache(model.config)
        kw = cache_kwargs(model, cache)
        parts = []
        for lo, hi in ((0, 70), (70, 71), (71, 150)):
            parts.append(model(ids[:, lo:hi], attention_mask=mask[:, :hi], position_ids=pos[:, lo:hi],
                               **kw).logits)
        chunked = torch.cat(parts, 1)
        step = torch.randint(3, 256, (2, 1))
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        a = model(step, attention_mask=mask2, position_ids=pos[:, -1:] + 1, **kw).logits
        whole = torch.cat([ids, step], 1)
        b = model(whole, attention_mask=mask2, position_ids=positions(mask2), use_cache=False).logits
    assert_rel(one, chunked, mask.bool())
    assert_rel(b[:, -1:], a, torch.ones(2, 1, dtype=torch.bool))
    if force == "sa":
        assert max(max(e["tokens_held"]) for e in cache.memory_report()["layers"]) <= 48


def test_cache_misuse_errors():
    ids, mask = padded([20, 10], side="left")
    sdpa = tiny_model("llama")
    with pytest.raises(RuntimeError, match="attn_implementation='flux'"):
        with torch.no_grad():
            sdpa(ids, attention_mask=mask, **cache_kwargs(sdpa, fa.FluxCache(sdpa.config)))
    model = flux_copy(sdpa, fa.RouterConfig(force="fa", **SMALL))
    with pytest.raises(NotImplementedError, match="beam search"):
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False,
                           **cache_kwargs(model, fa.FluxCache(model.config)))
    cache = fa.FluxCache(model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwargs(model, cache))
        with pytest.raises(ValueError, match="batch of 2"):
            model(ids[:1, -1:], **cache_kwargs(model, cache))
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="needs attn_implementation='flux'"):
        with torch.no_grad():
            model(ids, attention_mask=mask, **cache_kwargs(model, fa.FluxCache(model.config)))
    model.set_attn_implementation("flux")
    model.train()
    with pytest.raises(RuntimeError, match="model.eval"):
        model(ids, attention_mask=mask, **cache_kwargs(model, fa.FluxCache(model.config)))


def test_two_thousand_token_generation_memory():
    """The acceptance run: 2K generated tokens with the production pattern shape (sink 128,
    2 local blocks of 128), batch 2; an SA layer never holds more than sink + window tokens."""
    cfg = dict(block_size=128, sink_tokens=128, local_blocks=2)
    model = flux_copy(tiny_model("llama"), fa.RouterConfig(force="fa", force_sparse_layers={1}, **cfg))
    ids, mask = padded([300, 150], side="left")
    n = 2048
    cache = fa.FluxCache(model.config)
    watch = Watch(cache)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([watch]), **cache_kwargs(model, cache))
    assert watch.steps == n
    report = cache.memory_report()
    fa_layer, sa_layer = report["layers"]
    assert fa_layer["tokens_held"] == fa_layer["tokens_total"] == [300 + n - 1, 150 + n - 1]
    assert watch.max_held[1].max() <= 128 + 2 * 128 + 128
    assert watch.max_held[1].max() <= 128 + 2 * 128
    assert sa_layer["bytes_held"] < 0.2 * sa_layer["bytes_dense"]
    assert 0.35 < report["saved_fraction"] < 0.5


def poison_unmapped(layer):
    """NaN into every page no sequence maps (page 0 included), so reading an evicted page fails."""
    unmapped = torch.ones(layer.k_pages.shape[0], dtype=torch.bool)
    unmapped[layer.block_table_host.flatten().long()] = False
    unmapped[0] = True
    unmapped = unmapped.to(layer.k_pages.device)
    layer.k_pages[unmapped] = float("nan")
    layer.v_pages[unmapped] = float("nan")


def test_sa_layer_after_32k_prompt_and_4k_generation(device):
    """The acceptance measurement at the production pattern (sink 128 + 16 blocks of 128): one
    layer's cache, a 32K-token prompt, then 4096 decode steps through append_kv. Sequence 0 is
    routed SA, sequence 1 FA. Measured after every step: the SA sequence never holds more than
    sink + window (+ one page, the issue's bound), the FA one holds everything; pages are not
    leaked; decoding over the evicted cache (unmapped pages NaN) equals sparse_attention /
    full_attention over the whole sequence. A second, SA-only layer shows freed pages are reused:
    its pool does not grow during generation. Small heads on CPU, the real ones on CUDA."""
    from flux_attention.cache import FluxCacheLayer

    from utils import assert_same_up_to_order

    sink, local, bs = 128, 16, 128
    prompt, gen = 32768, 4096
    # bf16 on both devices: decode and the prefill op then agree to one bf16 rounding, where fp32
    # over 36K keys would differ by accumulation order beyond the fp32 bound.
    hq, hk, d, dtype = (4, 1, 16, torch.bfloat16) if device == "cpu" else (32, 8, 128, torch.bfloat16)
    total = prompt + gen
    keys = torch.randn(2, total, hk, d, device=device).to(dtype)
    values = torch.randn(2, total, hk, d, device=device).to(dtype)

    def new_layer(flags):
        layer = FluxCacheLayer()
        layer.lazy_initialization(keys, values)
        layer.start(len(flags), torch.tensor(flags, device=device), block_size=bs, sink_tokens=sink,
                    local_blocks=local, num_heads_k=hk, head_dim=d)
        n = len(flags)
        cu = torch.arange(n + 1, dtype=torch.int32, device=device) * prompt
        layer.append_varlen(keys[:n, :prompt].reshape(-1, hk, d), values[:n, :prompt].reshape(-1, hk, d), cu,
                            [prompt] * n)
        return layer

    mixed = new_layer([True, False])
    sa_only = new_layer([True])
    sa_pool = sa_only.k_pages.shape[0]
    bound = sink + local * bs
    max_held = 0
    checkpoints = {0, 1, bs - 1, bs, 2047, gen - 1}
    for step in range(gen):
        pos = prompt + step
        mixed.append_one(keys[:, pos], values[:, pos])
        sa_only.append_one(keys[:1, pos], values[:1, pos])
        held = mixed.tokens_held()
        max_held = max(max_held, int(held[0]), int(sa_only.tokens_held()[0]))
        assert int(held[1]) == pos + 1, (step, held)
        if step not in checkpoints:
            continue
        poison_unmapped(mixed)
        q = torch.randn(2, hq, d, device=device).to(dtype)
        out, lse = fa.decode_attention(q, mixed.k_pages, mixed.v_pages, mixed.cache_seqlens,
                                       block_table=mixed.block_table, use_sparse=mixed.use_sparse)
        n = pos + 1
        ref_sa = fa.sparse_attention(q[0][None, None], keys[0, :n][None], values[0, :n][None])
        ref_fa = fa.full_attention(q[1][None, None], keys[1, :n][None], values[1, :n][None], causal=True)
        for b, (ref_out, ref_lse) in enumerate((ref_sa, ref_fa)):
            what = f"step {step}, sequence {b} ({'SA' if b == 0 else 'FA'}) decode vs prefill op"
            assert_same_up_to_order(f"{what} out", out[b], ref_out[0, 0])
            assert_same_up_to_order(f"{what} lse", lse[b], ref_lse[0, :, 0])
    assert max_held <= bound + bs, max_held  # the acceptance bound: sink + window + one page
    assert max_held <= bound, max_held  # what eviction guarantees
    assert mixed.tokens_held().tolist() == [bound, total]
    assert mixed.pages_in_use() == int((mixed.block_table_host != 0).sum())  # no leaked pages
    assert sa_only.k_pages.shape[0] == sa_pool, (sa_pool, sa_only.k_pages.shape[0])  # freed pages reused
    assert sa_only.pages_in_use() == sink // bs + local
