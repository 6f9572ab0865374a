"""bench/e2e.py: its floor arithmetic (against the streaming rule written independently in
reference.py) and a smoke run of the whole pipeline on the tiny CPU config."""

import json
import os
import sys

import pytest
import torch
from reference import visible_mask

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from bench import e2e  # noqa: E402
from bench.e2e_floor import (  # noqa: E402
    ModelShape,
    Pattern,
    decode_step_bytes,
    fa_pairs,
    prefill_floor_ms,
    sa_pairs,
    visible_keys,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = ModelShape(hidden=64, intermediate=128, layers=4, heads_q=4, heads_kv=2, head_dim=16, vocab=256,
                   elem_bytes=2)


@pytest.mark.parametrize("sink,local,bs", [(16, 2, 16), (128, 16, 128), (32, 3, 16)])
def test_visible_keys_follow_the_streaming_rule(sink, local, bs):
    n = 700
    mask = visible_mask(n, n, causal=True, streaming=True, sink_tokens=sink, local_blocks=local,
                        block_size=bs)
    pattern = Pattern(sink, local, bs)
    assert torch.equal(visible_keys(torch.arange(n), pattern), mask.sum(1))
    assert sa_pairs(n, pattern) == int(mask.sum())
    assert fa_pairs(n) == int(visible_mask(n, n, causal=True).sum())


def test_floors_add_up():
    pattern = Pattern(16, 2, 16)
    lin = 1e-3  # ms per token
    f = prefill_floor_ms(200, 1, SHAPE, lin, pattern, attn_tflops=1.0)
    flops = 4 * SHAPE.heads_q * SHAPE.head_dim
    assert f["linear_ms"] == pytest.approx(0.2)
    assert f["fa_ms"] == pytest.approx(3 * flops * fa_pairs(200) / 1e12 * 1e3)
    assert f["sa_ms"] == pytest.approx(flops * sa_pairs(200, pattern) / 1e12 * 1e3)
    assert f["floor_ms"] == pytest.approx(f["linear_ms"] + f["fa_ms"] + f["sa_ms"])
    b = decode_step_bytes(200, 3, 1, SHAPE, pattern)
    kv_token = 2 * 2 * 16 * 2
    sa_tokens = int(visible_keys(torch.tensor([200]), pattern)[0])
    assert sa_tokens == 16 + (200 - 11 * 16 + 1)  # sink + blocks 11..12 up to the token itself
    assert b["kv"] == 3 * kv_token * (3 * 201 + sa_tokens)
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 2 * 64 * 128 + 128 * 64 + 2 * 64
    assert b["weights"] == 2 * (4 * per_layer + 64 + 256 * 64 + 3 * 64)


def test_tiny_run_end_to_end(tmp_path):
    """The whole pipeline on CPU: every configuration and length measured, floors and ratios
    filled in, the largest-batch path taken, JSON and PNG written, no step failed."""
    res, out = tmp_path / "results", tmp_path / "out"
    argv = ["--tiny", "--configs", "sdpa,flux_fa,flux_sa75", "--lengths", "64,128", "--batches", "1,2",
            "--cpu-largest-batch", "2", "--budget-s", "600", "--results-dir", str(res),
            "--out-dir", str(out), "--name", "e2e_test"]
    assert e2e.main(argv) == 0
    for d in (res, out):
        assert (d / "e2e_test.json").exists()
    # The plot goes to the output folder only: bench/results keeps text.
    assert (out / "e2e_test.png").stat().st_size > 1000 and not (res / "e2e_test.png").exists()
    data = json.loads((res / "e2e_test.json").read_text())
    assert data["errors"] == [] and data["skipped"] == []
    got = {(r["config"], r["length"]) for r in data["prefill"]}
    assert got == {(c, L) for c in ("sdpa", "flux_fa", "flux_sa75") for L in (64, 128)}
    for r in data["prefill"]:
        assert r["ms"] > 0 and r["floor_ms"] > 0 and r["speedup_vs_sdpa"] > 0
        assert r["sa_layers"] == {"sdpa": 0, "flux_fa": 0, "flux_sa75": 6}[r["config"]]
        assert r["kv_bytes_per_sequence"] > 0
    decode = {(r["config"], r["length"], r["batch"]) for r in data["decode"]}
    assert {(c, L, b) for c in ("sdpa", "flux_fa", "flux_sa75") for L in (64, 128) for b in (1, 2)} <= decode
    assert all(r["mode"] == "eager" and r["tokens_per_s"] > 0 for r in data["decode"])
    largest = {(r["config"], r["length"]): r for r in data["largest_batch"]}
    assert largest[("sdpa", 128)]["largest"] == 2 and largest[("flux_sa75", 128)]["largest"] == 2
    # flux_sa75 holds sink + window only in its SA layers: less KV than all-FA at 128 tokens
    kv = {(r["config"], r["length"]): r["kv_bytes_per_sequence"] for r in data["prefill"]}
    assert kv[("flux_sa75", 128)] < kv[("flux_fa", 128)]
    names = [a["criterion"] for a in data["acceptance"]]
    assert any("largest batch" in n for n in names) and any("router overhead" in n for n in names)
    assert data["router_overhead"]["eager_ms"] > 0
    assert "Acceptance" in data["summary"]


def test_tiny_run_with_fused_ops(tmp_path):
    """--fused-ops: flux configs run with fuse_ops, sdpa_fused joins as a second anchor, and plain
    sdpa stays unfused (its modules keep their own forward)."""
    res = tmp_path / "results"
    argv = ["--tiny", "--fused-ops", "--configs", "sdpa,sdpa_fused,flux_sa75", "--lengths", "64",
            "--batches", "1", "--no-largest", "--budget-s", "300", "--results-dir", str(res),
            "--out-dir", str(tmp_path / "out"), "--name", "e2e_fused_test"]
    assert e2e.main(argv) == 0
    data = json.loads((res / "e2e_fused_test.json").read_text())
    assert data["errors"] == [] and data["skipped"] == []
    rows = {r["config"]: r for r in data["prefill"]}
    assert set(rows) == {"sdpa", "sdpa_fused", "flux_sa75"}
    assert all(r["speedup_vs_sdpa_fused"] > 0 for r in rows.values())
    assert "vs sdpa_fused" in data["summary"] and "flux_sa75 +fused" in data["summary"]


def test_bench_use_switches_fused_ops():
    args = e2e.parse(["--tiny", "--fused-ops", "--configs", "sdpa,sdpa_fused,flux_fa", "--lengths", "64"])
    bench = e2e.Bench(args)
    bench.build()
    norms = [m for m in bench.model.modules() if type(m).__name__.endswith("RMSNorm")]
    for config, fused in (("sdpa_fused", True), ("sdpa", False), ("flux_fa", True), ("sdpa", False)):
        bench.use(config)
        assert all(("forward" in vars(m)) == fused for m in norms), config
