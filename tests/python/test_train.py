"""Router training (train/): config validation, synthetic tasks, packing, one step in-process, and
torchrun (gloo, 2 CPU ranks) runs: checkpoints, SIGTERM, and a SIGKILLed run that resumes to the
bitwise-identical losses of an uninterrupted run."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from train import synthetic  # noqa: E402
from train.config import TASK_CLASSES, ConfigError, DataConfig, load_config  # noqa: E402
from train.data import Packer, byte_tokenizer, encode_record, record_source, task_class  # noqa: E402

TINY = os.path.join(ROOT, "configs", "tiny.yaml")
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable


def write(path, text):
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------------
# config


def test_config_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unknown key 'train.stepz'")):
        load_config(path)
    path = write(tmp_path / "bad2.yaml", "trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_config(path)


@pytest.mark.parametrize("override,key", [
    ("--train.steps=0", "train.steps"),
    ("--optim.betas=[0.9]", "optim.betas"),
    ("--train.steps=three", "train.steps"),
    ("--loss.targets=[0.5,0.5]", "loss.targets"),
    ("--data.tasks={passkey: 1, riddles: 2}", "data.tasks"),
    ("--model.dtype=float8", "model.dtype"),
    ("--data.source=records.csv", "data.source"),
    ("--router.sink_tokens=20", "sink_tokens"),
    ("--router.pool_sise=3", "pool_sise"),
    ("--train.nested.x=1", "train.nested"),
])
def test_config_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert key in str(e.value) and TINY in str(e.value)


def test_config_overrides_apply():
    cfg = load_config(TINY, ["--train.steps=7", "--optim.betas=[0.8, 0.9]", "--router.pool_size=8"])
    assert cfg.train.steps == 7 and cfg.optim.betas == [0.8, 0.9]
    assert cfg.router_config().pool_size == 8 and cfg.router_config().block_size == 16


def test_cli_rejects_bad_config_before_any_work(tmp_path, capsys):
    from train.__main__ import run

    path = write(tmp_path / "bad.yaml", "model:\n  name: random\n  llama: {hidden_size: 8}\n  dtipe: float32\n")
    assert run(["--config", path]) == 2
    err = capsys.readouterr().err
    assert "model.dtipe" in err and path in err


# ---------------------------------------------------------------------------------------------
# synthetic tasks: an independent solver answers every record from its context and question


def _solve(rec):
    ctx, q = rec["context"], rec["question"]
    task = rec["task"]
    if task == "passkey":
        return re.search(r"The pass key is (\d+)\.", ctx).group(1)
    if task == "multikey_needle":
        key = re.search(r"number for (\S+)\?", q).group(1)
        (value,) = re.findall(rf"numbers for {re.escape(key)} is: (\d+)\.", ctx)
        return value
    if task == "kv_retrieval":
        key = re.search(r'key "([^"]+)"', q).group(1)
        return json.loads(ctx.split("\n", 1)[1])[key]
    if task == "variable_tracking":
        value = re.search(r"value (\d+)", q).group(1)
        resolved = {}
        for name, rhs in re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", ctx):
            resolved[name] = resolved.get(rhs[4:]) if rhs.startswith("VAR ") else rhs
        return " ".join(n for n, v in resolved.items() if v == value)
    if task == "summary":
        return " ".join(p.split(".")[0] + "." for p in ctx.split("\n\n"))
    if task == "continuation":
        paras = ctx.split("\n\n")
        period = next(p for p in range(1, len(paras) + 1)
                      if all(paras[i] == paras[i % p] for i in range(len(paras))))
        return paras[len(paras) % period]
    raise AssertionError(task)


@pytest.mark.parametrize("task", sorted(synthetic.TASKS))
def test_synthetic_records_are_answerable(task):
    for i in range(25):
        rec = synthetic.generate(3, i, {task: 1.0}, 300, 3000)
        assert set(rec) == {"context", "question", "answer", "task"} and rec["task"] == task
        assert len(rec["context"]) >= 300
        assert _solve(rec) == rec["answer"], f"{task} record {i}"
        assert 0 <= task_class(task) < len(TASK_CLASSES)


def test_synthetic_is_deterministic_and_mixes_tasks():
    a = [synthetic.generate(1, i, {t: 1.0 for t in synthetic.TASKS}, 100, 200) for i in range(60)]
    b = [synthetic.generate(1, i, {t: 1.0 for t in synthetic.TASKS}, 100, 200) for i in range(60)]
    assert a == b
    assert {r["task"] for r in a} == set(synthetic.TASKS)
    classes = {task_class(r["task"]) for r in a}
    assert classes == {0, 1, 2, 3}  # no synthetic task is in-context learning


# ---------------------------------------------------------------------------------------------
# tokenisation and packing


def test_byte_tokenizer_roundtrip_and_chat_template():
    tok = byte_tokenizer()
    text = "naïve café: 42 ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) and all(3 <= i < 259 for i in ids)
    assert tok.decode(ids) == text
    prompt, answer = encode_record(tok, {"context": "ctx", "question": "q?", "answer": "42"}, True)
    assert tok.decode(prompt) == "<|user|>\nctx\n\nq?\n<|assistant|>\n"
    assert answer[-1] == tok.eos_token_id and tok.decode(answer[:-1]) == "42"
    prompt, _ = encode_record(tok, {"context": "ctx", "question": "q?", "answer": "42"}, False)
    assert prompt[0] == tok.bos_token_id and tok.decode(prompt[1:]) == "ctx\n\nq?\nAnswer: "


def _check_pack(pack, items, budget, loss_on):
    cu = pack.cu_seqlens.tolist()
    assert pack.cu_seqlens.dtype == torch.int32 and cu[0] == 0 and cu[-1] == pack.tokens <= budget
    assert pack.max_seqlen == max(b - a for a, b in zip(cu, cu[1:]))
    ids, labels, pos = pack.input_ids.tolist(), pack.labels.tolist(), pack.position_ids.tolist()
    for (prompt, answer, cls), a, b, t in zip(items, cu, cu[1:], pack.tasks.tolist()):
        assert ids[a:b] == prompt + answer and pos[a:b] == list(range(b - a)) and t == cls
        for j in range(a, b):
            want = ids[j + 1] if j + 1 < b and (loss_on == "all" or j + 1 - a >= len(prompt)) else -100
            assert labels[j] == want


@pytest.mark.parametrize("loss_on", ["all", "answer"])
def test_greedy_packing_and_cu_seqlens(loss_on):
    tok = byte_tokenizer()
    cfg = DataConfig(pack_tokens=700, min_context_chars=50, max_context_chars=650, loss_on=loss_on, seed=5)
    source = record_source(cfg)
    packer = Packer(source, tok, cfg, rank=1, world=2)
    k = 0  # this rank's records are 1, 3, 5, ...
    for _ in range(8):
        items = []
        pack = packer.next_pack()
        n = pack.cu_seqlens.numel() - 1
        while len(items) < n:
            rec = source(2 * k + 1)
            prompt, answer = encode_record(tok, rec, True)
            k += 1
            if len(prompt) + len(answer) > cfg.pack_tokens:
                continue  # dropped: longer than a pack
            items.append((prompt, answer, task_class(rec["task"])))
        _check_pack(pack, items, cfg.pack_tokens, loss_on)
        # Greedy: the next record that fits a pack would not have fit this one.
        nxt = source(2 * packer.cursor + 1)
        length = sum(map(len, encode_record(tok, nxt, True)))
        assert length > cfg.pack_tokens or pack.tokens + length > cfg.pack_tokens
    assert packer.dropped > 0  # max_context_chars > pack_tokens: some records never fit
    resumed = Packer(source, tok, cfg, rank=1, world=2)
    resumed.load_state_dict(packer.state_dict())
    assert torch.equal(resumed.next_pack().input_ids, packer.next_pack().input_ids)
    with pytest.raises(ValueError, match="rank 1 of 2"):
        Packer(source, tok, cfg, rank=0, world=2).load_state_dict(packer.state_dict())


def test_jsonl_records_and_documents(tmp_path):
    rows = [{"context": "c" * 40, "question": "q", "answer": "a", "task": "summarization"},
            {"text": "plain document " * 5},
            {"context": "x", "question": "y", "answer": "z", "task": 1}]
    path = write(tmp_path / "r.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DataConfig(source=path, pack_tokens=10_000)
    source = record_source(cfg)
    got = [source(i) for i in range(6)]
    assert sorted(json.dumps(r, sort_keys=True) for r in got[:3]) == \
        sorted(json.dumps(r, sort_keys=True) for r in got[3:])  # each epoch visits every record
    pack = Packer(source, byte_tokenizer(), cfg).next_pack()
    assert pack.cu_seqlens.numel() - 1 >= 3 and sorted(set(pack.tasks.tolist())) == [1, 2, 3]
    bad = write(tmp_path / "bad.jsonl", json.dumps({"context": "c", "question": "q", "answer": "a",
                                                     "task": "poetry"}) + "\n")
    with pytest.raises(ValueError, match="record 1: unknown task 'poetry'"):
        record_source(DataConfig(source=bad))(0)


# ---------------------------------------------------------------------------------------------
# one step in-process


def test_one_step_trains_only_the_routers(tmp_path):
    from flux_attention import hf
    from train.trainer import Trainer

    cfg = load_config(TINY, [f"--checkpoint.dir={tmp_path}/ckpt", f"--metrics.file={tmp_path}/m.jsonl",
                             "--metrics.progress_bar=false", "--train.steps=4", "--loss.lambda_init=0.5"])
    trainer = Trainer(cfg)
    try:
        model = trainer.model
        base = {n: p.detach().clone() for n, p in model.named_parameters() if "mask_allocator" not in n}
        router = {n: p.detach().clone() for n, p in model.named_parameters() if "mask_allocator" in n}
        lambdas = [p.detach().clone() for p in trainer.mult.parameters()]
        assert all(not p.requires_grad for n, p in model.named_parameters() if n in base)
        assert all(r.training for r in hf.routers(model).values())
        # Calibrated before step 1: every router standardises its inputs (not the identity).
        for r in hf.routers(model).values():
            assert not torch.equal(r.feature_shift, torch.zeros_like(r.feature_shift))
            assert bool((r.feature_scale > 0).all()) and not torch.equal(r.feature_scale, torch.ones_like(r.feature_scale))
        assert trainer.packer.state_dict() == Packer(record_source(cfg.data), trainer.tok, cfg.data, 0, 1).state_dict()
        for _ in range(2):
            trainer.step += 1
            record = trainer.train_step()
            for key in ("loss", "lm_loss", "reg_loss", "tau", "grad_norm"):
                assert torch.isfinite(torch.tensor(record[key])), key
            # A random model over bytes: cross-entropy near log(vocab), not 0, not exploding.
            assert 3.0 < record["lm_loss"] < 8.0
            assert record["reg_loss"] > 0 and record["tokens"] > 0
        after = dict(model.named_parameters())
        assert all(torch.equal(after[n], t) for n, t in base.items())
        changed = [n for n, t in router.items() if not torch.equal(after[n], t)]
        assert any(n.endswith("cls_router_head_agnostic.4.bias") for n in changed)
        # d reg / d lambda = |s - target| >= 0 and the SA fraction starts at ~0: ascent raises them.
        assert all((new > old).any() for new, old in zip(trainer.mult.parameters(), lambdas))
    finally:
        trainer.close()


# ---------------------------------------------------------------------------------------------
# torchrun, 2 CPU ranks (gloo)


def _torchrun(tmp, name, *extra, steps=24):
    args = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "train", "--config", TINY, f"--checkpoint.dir={tmp}/{name}/ckpt",
            f"--metrics.file={tmp}/{name}/metrics.jsonl", "--metrics.progress_bar=false",
            f"--train.steps={steps}", "--checkpoint.interval=4", "--checkpoint.keep_latest=2", *extra]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _losses(path):
    out = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["loss"]  # a resumed run appends: the last line of a step wins
    return out


def _wait_for_step(path, step, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and max(_losses(path), default=0) >= step:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _finish(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def test_torchrun_two_ranks_kill_and_resume_exactly(tmp_path):
    import flux_attention as fa
    from safetensors.torch import load_file

    straight = _torchrun(tmp_path, "straight")
    killed = _torchrun(tmp_path, "killed")
    _wait_for_step(tmp_path / "killed/metrics.jsonl", 10, killed)
    # torchrun starts each worker in a session of its own: kill them all, as a crash would.
    for pid in _children(killed.pid) + [killed.pid]:
        os.kill(pid, signal.SIGKILL)
    killed.wait()
    seen = max(_losses(tmp_path / "killed/metrics.jsonl"))
    assert seen < 24, "the run ended before it could be killed"
    _finish(straight)
    ref = _losses(tmp_path / "straight/metrics.jsonl")
    assert sorted(ref) == list(range(1, 25))
    assert all(torch.isfinite(torch.tensor(v)) for v in ref.values())
    ckpt = tmp_path / "straight/ckpt"
    assert sorted(os.listdir(ckpt)) == ["step-00000020", "step-00000024"]  # keep_latest 2
    assert sorted(os.listdir(ckpt / "step-00000024")) == ["meta.json", "rank-0.pt", "rank-1.pt",
                                                          "router.safetensors"]
    assert json.loads((ckpt / "step-00000024/meta.json").read_text())["world_size"] == 2
    # The router file loads into a fresh model through the public API.
    from train.model import build_model

    model, _, _ = build_model(load_config(TINY), torch.device("cpu"))
    fa.load_router(model, str(ckpt / "step-00000024/router.safetensors"))

    out = _finish(_torchrun(tmp_path, "killed"))
    start = int(re.search(r"resumed from \S+ at step (\d+)", out).group(1))
    assert 8 <= start <= seen
    got = _losses(tmp_path / "killed/metrics.jsonl")
    for step in range(start + 1, 25):
        assert got[step] == ref[step], f"step {step}: {got[step]!r} != {ref[step]!r}"
    a = load_file(str(ckpt / "step-00000024/router.safetensors"))
    b = load_file(str(tmp_path / "killed/ckpt/step-00000024/router.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_sigterm_writes_a_checkpoint_and_exits(tmp_path):
    proc = _torchrun(tmp_path, "term", steps=10_000)
    _wait_for_step(tmp_path / "term/metrics.jsonl", 3, proc)
    os.kill(proc.pid, signal.SIGTERM)  # torchrun forwards it to its workers
    out, _ = proc.communicate(timeout=60)
    m = re.search(r"SIGTERM: checkpoint written at step (\d+)", out)
    assert m, out
    step = int(m.group(1))
    assert os.path.exists(tmp_path / f"term/ckpt/step-{step:08d}/meta.json")
    assert max(_losses(tmp_path / "term/metrics.jsonl")) == step
