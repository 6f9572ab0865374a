"""StaticDecodeLoop (greedy decode with static shapes, no host sync, optional CUDA graph) and the
FluxCache machinery it relies on: the per-step decode plan shared by all layers, reserve(), host
bookkeeping of replayed steps (advance_host) and batch selection / repetition.

References: model.generate (greedy) on the same model, and each sequence decoded alone."""

import pytest
import torch
from test_hf import SMALL, cache_kwargs, flux_copy, make_mixed, padded, positions, tiny_model
from transformers import DynamicCache

import flux_attention as fa
from flux_attention.decode_loop import StaticDecodeLoop

pytestmark = pytest.mark.usefixtures("one_thread")


def prefill(model, ids, mask, cache):
    """Prefill a (left-padded) batch; returns (first new token [B], its positions [B])."""
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=1,
                    **cache_kwargs(model, cache))
    return out.logits[:, -1].argmax(-1), mask.sum(1)


def generated(model, ids, mask, n, cache):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             **cache_kwargs(model, cache))
    return out[:, ids.shape[1]:]


def mixed_model(arch="llama", device="cpu", layers=3):
    """Learned routing that splits the batch below (some sequences FA, some SA, per layer)."""
    model = flux_copy(tiny_model(arch, device, num_hidden_layers=layers), fa.RouterConfig(**SMALL))
    ids, mask = (t.to(device) for t in padded([90, 64, 120, 33], side="left"))
    make_mixed(model, ids, mask)
    return model, ids, mask


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_eager_loop_equals_generate(arch, device):
    """Greedy tokens of the loop = generate's, over page boundaries and SA eviction, with learned
    mixed routing in a left-padded batch."""
    model, ids, mask = mixed_model(arch, device)
    n = 60
    want = generated(model, ids, mask, n, fa.FluxCache(model.config))
    cache = fa.FluxCache(model.config)
    first, pos = prefill(model, ids, mask, cache)
    loop = StaticDecodeLoop(model, cache)
    loop.start(first, pos, max_steps=n - 1)
    got = torch.cat([loop.step(20), loop.step(n - 21)], 1)
    assert torch.equal(got, loop.tokens)
    assert torch.equal(torch.cat([first[:, None], got], 1), want)
    assert loop.steps_left == 0
    with pytest.raises(ValueError, match="0 left of max_steps"):
        loop.step(1)


def test_eager_loop_drives_a_dynamic_cache():
    """The same loop drives transformers' default path (sdpa + DynamicCache), unpadded batch."""
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 50))
    mask = torch.ones_like(ids)
    want = generated(model, ids, mask, 12, DynamicCache(config=model.config))
    cache = DynamicCache(config=model.config)
    first, pos = prefill(model, ids, mask, cache)
    loop = StaticDecodeLoop(model, cache)
    loop.start(first, 50, max_steps=11)
    assert torch.equal(torch.cat([first[:, None], loop.step(11)], 1), want)


def test_loop_argument_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="cuda_graph needs a FluxCache"):
        StaticDecodeLoop(model, DynamicCache(config=model.config), cuda_graph=True)
    loop = StaticDecodeLoop(model, DynamicCache(config=model.config))
    with pytest.raises(RuntimeError, match="start"):
        loop.step(1)
    with pytest.raises(ValueError, match="input_ids must be an int64"):
        loop.start(torch.zeros(2, dtype=torch.int32), 5, 4)
    with pytest.raises(ValueError, match="positions must be"):
        loop.start(torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_steps"):
        loop.start(torch.zeros(2, dtype=torch.long), 5, 0)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        StaticDecodeLoop(model, DynamicCache(config=model.config))


def test_decode_plan_shares_state_and_updates_in_place():
    """During decode every layer reads the same cache_seqlens tensor and a row of one stacked
    block table; after reserve() no step plans on the host and no tensor is replaced (what a
    captured CUDA graph needs), across page boundaries; the tokens match an unreserved run."""
    model, ids, mask = mixed_model()
    n = 50  # > 3 pages of 16 tokens
    want = generated(model, ids, mask, n, fa.FluxCache(model.config))
    cache = fa.FluxCache(model.config)
    cache.reserve(n)  # before the prefill: the prefill sizes the pools for the decode too
    first, pos = prefill(model, ids, mask, cache)
    pools = [(l.k_pages, l.v_pages) for l in cache.layers]
    loop = StaticDecodeLoop(model, cache)
    loop.start(first, pos, max_steps=n - 1)
    loop.step(1)
    plan = cache._plan
    seqlens, tables = plan.seqlens, plan.tables
    ptrs = [(l.block_table.data_ptr(), l.k_pages.data_ptr()) for l in cache.layers]
    assert all(l.cache_seqlens is seqlens for l in cache.layers)
    assert all(l.block_table.data_ptr() == tables[i].data_ptr() for i, l in enumerate(cache.layers))
    calls = []
    for l in cache.layers:
        l.plan = lambda *a, _l=l, **k: calls.append(_l)  # host page planning must not happen
    got = loop.step(n - 2)
    for l in cache.layers:
        del l.plan
    assert not calls
    assert cache._plan is plan and plan.seqlens is seqlens and plan.tables is tables
    assert [(l.block_table.data_ptr(), l.k_pages.data_ptr()) for l in cache.layers] == ptrs
    assert all(l.k_pages is k and l.v_pages is v for l, (k, v) in zip(cache.layers, pools))
    assert torch.equal(torch.cat([first[:, None], loop.tokens], 1), want)
    assert got.shape == (4, n - 2)
    # Past the reserved pages, host planning and SA eviction resume.
    ps = SMALL["block_size"]
    with torch.no_grad():
        for _ in range(ps + 1):
            model(loop.ids, position_ids=loop.positions, **cache_kwargs(model, cache))
            loop.positions += 1
    bound = SMALL["sink_tokens"] + SMALL["local_blocks"] * SMALL["block_size"]
    for l in cache.layers:
        held = l.tokens_held()
        assert torch.equal(l.lengths_host, pos + n - 1 + ps + 1)
        for b, sparse in enumerate(l.use_sparse_host):
            assert held[b] <= bound if sparse else held[b] == l.lengths_host[b], (b, sparse, held[b])


def test_reserve_after_prefill_maps_pages_once_and_exactly():
    model, ids, mask = mixed_model()
    cache = fa.FluxCache(model.config)
    first, pos = prefill(model, ids, mask, cache)
    before = [l.k_pages.shape[0] for l in cache.layers]
    assert all(l._n_free == 0 for l in cache.layers)  # the prefill sized every pool exactly
    cache.reserve(40)
    ps = SMALL["block_size"]
    for l, n0 in zip(cache.layers, before):
        lengths = l.lengths_host
        need = int(((lengths + 40 + ps - 1) // ps - (lengths + ps - 1) // ps).sum())
        assert l._free_steps >= 40
        assert l.k_pages.shape[0] == n0 + need and l._n_free == 0  # one exact growth
        assert l.pages_in_use() == int((l.block_table_host != 0).sum())
    with pytest.raises(ValueError, match="non-negative int"):
        cache.reserve(-1)


def test_advance_host_accounts_for_replayed_steps():
    """Host bookkeeping of k steps = that of one real step plus advance_host(k - 1) (the device
    side comes from the graph replays); advancing past the reservation is refused."""
    model, ids, mask = mixed_model()
    a, b = fa.FluxCache(model.config), fa.FluxCache(model.config)
    for c in (a, b):
        c.reserve(30)
        first, pos = prefill(model, ids, mask, c)
    la, lb = StaticDecodeLoop(model, a), StaticDecodeLoop(model, b)
    la.start(first, pos, 30)
    lb.start(first, pos, 30)
    la.step(12)
    lb.step(1)
    b.advance_host(11)
    for x, y in zip(a.layers, b.layers):
        assert torch.equal(x.lengths_host, y.lengths_host)
        assert (x.seen, x._free_steps) == (y.seen, y._free_steps)
        assert torch.equal(x.block_table_host, y.block_table_host)
    assert a.get_seq_length() == b.get_seq_length()
    assert a._plan.steps == b._plan.steps
    with pytest.raises(RuntimeError, match="reserved"):
        b.advance_host(10 ** 6)
    with pytest.raises(RuntimeError, match="no decode step"):
        fa.FluxCache(model.config).advance_host(1)


def test_batch_select_and_repeat_copy_pages():
    """batch_select_indices([2, 0, 0]) and batch_repeat_interleave(2) give caches that decode like
    the selected sequences alone; the copies of a sequence are independent (writing one leaves
    the other intact) and the pools are sized exactly."""
    model, ids, mask = mixed_model()
    n = 40
    cache = fa.FluxCache(model.config)
    first, pos = prefill(model, ids, mask, cache)
    loop = StaticDecodeLoop(model, cache)
    loop.start(first, pos, 5)
    loop.step(5)  # selection after some decode steps (the plan must be given up first)
    base = torch.cat([first[:, None], loop.tokens], 1)
    pick = [2, 0, 0]
    before = cache.decisions()
    cache.batch_select_indices(torch.tensor(pick))
    assert cache.decisions() == {i: [row[j] for j in pick] for i, row in before.items()}
    for l in cache.layers:
        assert l.batch == 3 and l.pages_in_use() == int((l.block_table_host != 0).sum())
        assert l.k_pages.shape[0] == 1 + l.pages_in_use()
    sel = StaticDecodeLoop(model, cache)
    sel.start(loop.ids[pick, 0], loop.positions[pick, 0], n)
    out = sel.step(n)
    assert torch.equal(out[1], out[2])  # two copies of sequence 0 decode alike
    for row, b in enumerate(pick):  # each equals sequence b decoded alone from the start
        length = int(mask[b].sum())
        alone = generated(model, ids[b:b + 1, -length:], mask[b:b + 1, -length:], 6 + n,
                          fa.FluxCache(model.config))
        assert torch.equal(torch.cat([base[b], out[row]]), alone[0]), b
    cache.batch_repeat_interleave(2)
    assert [l.batch for l in cache.layers] == [6] * len(cache.layers)
    with pytest.raises(IndexError, match="out of range"):
        cache.batch_select_indices([7])
    with pytest.raises(ValueError, match="at least one"):
        cache.batch_select_indices([])
    with pytest.raises(ValueError, match="positive int"):
        cache.batch_repeat_interleave(0)
    fa.FluxCache(model.config).batch_select_indices([0, 0])  # an empty cache: nothing to do


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fuse_ops"])
def test_cuda_graph_loop_equals_eager_and_generate(fused):
    """Replaying the captured step gives generate's tokens, over page boundaries, with mixed
    routing; the NaN-poisoned unmapped pages are never read. fuse_ops: the decode step's linears,
    norms and RoPE are the flux kernels launched with programmatic dependent launch, whose
    overlap the graph keeps; the tokens must still be eager's and generate's."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, ids, mask = mixed_model("llama", "cuda")
    if fused:
        counts = fa.fuse_ops(model)
        assert counts["linear"] > 0 and counts["rms_norm"] > 0, counts
    try:
        assert_graph_loop_matches(model, ids, mask)
    finally:
        if fused:
            fa.unfuse_ops(model)  # fuse_ops patches the modeling module's RoPE for every model


def assert_graph_loop_matches(model, ids, mask):
    n = 70
    want = generated(model, ids, mask, n, fa.FluxCache(model.config))
    cache = fa.FluxCache(model.config)
    first, pos = prefill(model, ids, mask, cache)
    loop = StaticDecodeLoop(model, cache, cuda_graph=True, warmup_steps=2)
    loop.start(first, pos, max_steps=n - 1)
    for l in cache.layers:
        unmapped = torch.ones(l.k_pages.shape[0], dtype=torch.bool)
        unmapped[l.block_table_host.flatten().long()] = False
        unmapped[0] = True
        l.k_pages[unmapped.cuda()] = float("nan")
        l.v_pages[unmapped.cuda()] = float("nan")
    loop.step(n - 1 - loop.tokens.shape[1])
    got = torch.cat([first[:, None], loop.tokens], 1)
    assert torch.equal(got, want)
    eager = fa.FluxCache(model.config)
    first, pos = prefill(model, ids, mask, eager)
    el = StaticDecodeLoop(model, eager)
    el.start(first, pos, n - 1)
    el.step(n - 1)
    assert torch.equal(el.tokens, loop.tokens)
    loop.close()


@pytest.mark.cuda
def test_forced_prefill_and_decode_do_not_sync():
    """With forced routing (decisions known on the host) neither the prefill into a FluxCache nor
    the decode steps make flux attention wait for the device: no synchronising call is issued from
    flux_attention's own code (torch's sync debug mode warns, naming the calling line)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import warnings

    model = flux_copy(tiny_model("llama", "cuda", num_hidden_layers=3),
                      fa.RouterConfig(force="fa", force_sparse_layers={1}, **SMALL))
    ids = torch.randint(3, 256, (2, 150), device="cuda")
    cache = fa.FluxCache(model.config)
    cache.reserve(40)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                out = model(ids, logits_to_keep=1, **cache_kwargs(model, cache))
            loop = StaticDecodeLoop(model, cache)
            loop.start(out.logits[:, -1].argmax(-1), 150, 30)
            loop.step(30)  # crosses a page boundary (block 16)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ours = [w for w in caught if "flux_attention" in w.filename and "sync" in str(w.message).lower()]
    assert not ours, [(w.filename, w.lineno, str(w.message)[:80]) for w in ours]
