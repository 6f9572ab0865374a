"""Router training on 2 CPU ranks (gloo, torchrun): context parallelism (CP=2 routes and learns as
CP=1 on the same packs), FSDP2 sharding of the frozen base (same losses as the replicated base),
a stuck rank ending the job with a clear error; and in one process: KL distillation, parquet input,
TensorBoard keys, the throughput benchmark's plumbing."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from train.config import load_config  # noqa: E402

TINY = os.path.join(ROOT, "configs", "tiny.yaml")
PYTHON = sys.executable
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def _run(tmp, name, nproc, *extra, steps=3):
    launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] \
        if nproc > 1 else [PYTHON]
    args = launcher + ["-m", "train", "--config", TINY, f"--checkpoint.dir={tmp}/{name}/ckpt",
                       f"--metrics.file={tmp}/{name}/metrics.jsonl", "--metrics.progress_bar=false",
                       f"--train.steps={steps}", "--checkpoint.interval=100", *extra]
    return subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _records(path):
    out = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r
    return out


def _done(proc, timeout=150):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def test_context_parallel_two_ranks_matches_one(tmp_path):
    # CP=2 over 2 ranks is one pack stream (dp = 1): the same packs and Gumbel seed as 1 process.
    cp = _run(tmp_path, "cp2", 2, "--dist.context_parallel=2", "--model.activation_checkpointing=true")
    one = _run(tmp_path, "cp1", 1, "--model.activation_checkpointing=true")
    out = _done(cp)
    _done(one)
    a, b = _records(tmp_path / "cp2/metrics.jsonl"), _records(tmp_path / "cp1/metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        # the same decisions in every layer (per-layer SA fractions are counts of decisions)
        assert a[step]["sa_fraction_per_layer"] == b[step]["sa_fraction_per_layer"], step
        assert a[step]["tokens"] == b[step]["tokens"]
        for key in ("loss", "lm_loss", "reg_loss", "grad_norm"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-4, abs=1e-6), (step, key)
        for key in ("lambda1", "lambda2"):
            for cls, value in a[step][key].items():
                assert value == pytest.approx(b[step][key][cls], rel=1e-5, abs=1e-7), (step, key, cls)
    assert "routed differently" not in out


def test_fsdp_shards_the_base_and_trains_like_replicated(tmp_path):
    sharded = _run(tmp_path, "fsdp", 2, "--dist.fsdp=true", "--model.activation_checkpointing=true")
    replicated = _run(tmp_path, "ddp", 2, "--model.activation_checkpointing=true")
    out = _done(sharded)
    _done(replicated)
    m = re.search(r"fsdp: (\d+) of (\d+) base parameters on rank 0", out)
    assert m, out
    assert 0 < int(m.group(1)) < int(m.group(2))
    a, b = _records(tmp_path / "fsdp/metrics.jsonl"), _records(tmp_path / "ddp/metrics.jsonl")
    for step in (1, 2, 3):
        for key in ("loss", "lm_loss", "reg_loss", "grad_norm", "sa_fraction_per_layer"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-6, abs=1e-7), (step, key)


def _workers(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_stuck_rank_ends_the_job_with_a_clear_error(tmp_path):
    proc = _run(tmp_path, "stuck", 2, "--dist.timeout_s=5", steps=10_000)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    path = tmp_path / "stuck/metrics.jsonl"
    deadline = time.time() + 120
    while not (path.exists() and _records(path)):
        assert proc.poll() is None and time.time() < deadline, "".join(lines)
        time.sleep(0.05)
    workers = sorted(_workers(proc.pid))
    os.kill(workers[-1], signal.SIGSTOP)  # rank 1 freezes: alive, but never joins a collective again
    start = time.time()
    message = re.compile(r"did not finish within dist.timeout_s=5 s; another rank has died or hangs")
    try:
        while not any(message.search(line) for line in list(lines)):
            assert time.time() - start < 60, "".join(lines)
            time.sleep(0.05)
        detected = time.time() - start
        # torchrun now stops the job; let the frozen rank take its SIGTERM instead of waiting out
        # torchrun's 30 s grace period before SIGKILL.
        os.kill(workers[-1], signal.SIGCONT)
        proc.wait(timeout=90)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    reader.join(timeout=10)
    assert proc.returncode != 0
    assert detected < 5 + 30, detected  # the timeout plus the step in flight


# ---------------------------------------------------------------------------------------------
# one process


def _trainer(tmp_path, *extra):
    from train.trainer import Trainer

    cfg = load_config(TINY, [f"--checkpoint.dir={tmp_path}/ckpt", f"--metrics.file={tmp_path}/m.jsonl",
                             "--metrics.progress_bar=false", "--train.steps=4", *extra])
    return Trainer(cfg)


@pytest.mark.parametrize("force,zero", [("fa", True), ("sa", False)])
def test_kl_distillation_to_the_all_fa_model(tmp_path, one_thread, force, zero):
    trainer = _trainer(tmp_path, "--loss.kl_weight=0.5", f"--router.force={force}")
    try:
        trainer.step = 1
        r = trainer.train_step()
    finally:
        trainer.close()
    # The teacher is the student with every layer on FA: identical when the student is all-FA.
    if zero:
        assert abs(r["kl_loss"]) < 1e-6
    else:
        assert r["kl_loss"] > 1e-4
    assert r["loss"] == pytest.approx(r["lm_loss"] + 0.5 * r["kl_loss"] + r["reg_loss"], rel=1e-6)


def test_kl_gradient_reaches_the_routers(tmp_path, one_thread):
    from flux_attention import hf

    trainer = _trainer(tmp_path, "--loss.kl_weight=1.0", "--loss.lm_weight=0.0")
    try:
        trainer.step = 1
        trainer.train_step()
        grads = [p.grad for r in hf.routers(trainer.model).values() for p in r.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    finally:
        trainer.close()


def test_parquet_records_row_groups_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from train.data import record_source
    from train.config import DataConfig

    rows = [{"context": f"ctx {i}", "question": "q", "answer": str(i), "task": "single_qa"} for i in range(7)]
    rows += [{"context": "m", "question": "q", "answer": "meta", "metadata": {"task": "code"}}]
    rows[2]["task"] = None  # falls back to nothing: an error naming the row
    table = pa.Table.from_pylist([{k: r.get(k) for k in ("context", "question", "answer", "task")} |
                                  {"metadata": r.get("metadata", {"task": None})} for r in rows])
    path = str(tmp_path / "r.parquet")
    pq.write_table(table, path, row_group_size=3)
    source = record_source(DataConfig(source=path, seed=4))
    with pytest.raises(ValueError, match=r"r.parquet: row group 0 row 2: unknown task None"):
        for i in range(8):
            source(i)
    rows[2]["task"] = "multi_hop_qa"
    table = pa.Table.from_pylist([{k: r.get(k) for k in ("context", "question", "answer", "task")} |
                                  {"metadata": r.get("metadata", {"task": None})} for r in rows])
    pq.write_table(table, path, row_group_size=3)
    source = record_source(DataConfig(source=path, seed=4))
    epoch0 = [source(i)["answer"] for i in range(8)]
    epoch1 = [source(8 + i)["answer"] for i in range(8)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(r["answer"] for r in rows)
    assert epoch0 != epoch1  # a new order each epoch
    assert [source(i)["answer"] for i in range(8)] == epoch0  # deterministic
    meta = next(source(i) for i in range(8) if source(i)["answer"] == "meta")
    assert meta["task"] == "code"
    cfg = load_config(TINY, [f"--data.source={path}"])
    assert cfg.data.source == path


def test_tensorboard_has_the_issue_keys(tmp_path, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    proc = _run(tmp_path, "tb", 1, f"--metrics.tensorboard={tb}", steps=2)
    _done(proc)
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in ("loss", "lm_loss", "reg_loss", "tau", "tokens_per_s", "peak_mem_gib", "lambda1/single_qa",
                "lambda2/summarization"):
        assert key in tags, (key, sorted(tags))
    assert any(t.startswith("sa_fraction_per_task/") for t in tags)
    rec = _records(tmp_path / "tb/metrics.jsonl")[2]
    for key in ("loss", "lm_loss", "kl_loss", "reg_loss", "sa_fraction_per_task", "lambda1", "lambda2", "tau",
                "tokens_per_s", "tokens_per_s_per_device", "peak_mem_gib", "step_time_s"):
        assert key in rec, key


def test_train_throughput_bench_plumbing(tmp_path):
    out = subprocess.run([PYTHON, "bench/train_throughput.py", "--config", TINY, "--device", "cpu", "--steps", "1",
                          "--warmup", "1", "--docs", "2", "--name", "plumbing", "--results-dir", str(tmp_path)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads((tmp_path / "plumbing.json").read_text())
    (r,) = doc["results"]
    assert r["tokens_per_step"] == 2048 and r["docs_per_pack"] == 2 and r["timed_steps"] == 1
    assert r["tokens_per_s_per_device"] > 0 and r["flops_per_pack"]["total"] > 0
    assert "tokens/s/device" in out.stdout and (tmp_path / "plumbing.md").exists()


@pytest.mark.parametrize("overrides,key", [
    (["--dist.context_parallel=0"], "dist.context_parallel"),
    (["--dist.context_parallel=3"], "data.pack_tokens"),  # 2048 tokens do not split over 3 ranks
    (["--loss.kl_weight=-1"], "loss.kl_weight"),
    (["--loss.lm_weight=0"], "loss.lm_weight"),
    (["--dist.fsdp=true", "--model.train_qkv=true"], "dist.fsdp"),
    (["--data.source=records.csv"], "data.source"),
])
def test_new_config_keys_are_validated(overrides, key):
    from train.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert key in str(e.value) and TINY in str(e.value)


def test_grad_accumulation_averages_the_packs(tmp_path, one_thread):
    """One step over 2 packs has the mean of the gradients of 2 steps over 1 pack each (the
    learning rates so small that the weights do not move, a constant temperature)."""
    from flux_attention import hf

    still = ["--optim.lr=1e-30", "--loss.lambda_lr=1e-30", "--router.tau_max=1.0", "--router.tau_min=1.0",
             "--optim.grad_clip=0"]

    def grads(trainer):
        return [p.grad.clone() for r in hf.routers(trainer.model).values() for p in r.parameters()] + \
            [p.grad.clone() for p in trainer.mult.parameters()]

    two = _trainer(tmp_path / "a", "--train.grad_accum=2", *still)
    try:
        two.step = 1
        r2 = two.train_step()
        g_two = grads(two)
    finally:
        two.close()
    one = _trainer(tmp_path / "b", *still)
    try:
        per_step, losses = [], []
        for step in (1, 2):
            one.step = step
            losses.append(one.train_step()["loss"])
            per_step.append(grads(one))
    finally:
        one.close()
    assert r2["tokens"] > 0 and r2["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    for a, b, c in zip(g_two, *per_step):
        torch.testing.assert_close(a, (b + c) / 2, rtol=1e-5, atol=1e-9)
    assert any(g.abs().sum() > 0 for g in g_two)
