"""flux_attention.eval: synthetic examples at target lengths, scoring (against an independent SDPA
forward and transformers' own greedy generate), jsonl records, the summary and report files, and
the CLI (argument errors, and one end-to-end run on a tiny saved model)."""

import json
import math
import os
import re
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import flux_attention as fa
from flux_attention import hf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from flux_attention.eval import report, suite  # noqa: E402
from flux_attention.eval.__main__ import main as cli  # noqa: E402
from train.data import byte_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(pool_size=16, block_size=16, sink_tokens=16, local_blocks=2)


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=260, max_position_embeddings=1024, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def two_examples(tok):
    """A retrieval-heavy and a holistic example (byte tokens: continuation needs ~1K)."""
    return (suite.synthetic_examples(tok, ["passkey"], [300], 1)
            + suite.synthetic_examples(tok, ["continuation"], [1000], 1))


@pytest.fixture
def routed():
    """A tiny model with untrained routers (its SDPA twin is the reference)."""
    ref = tiny()
    model = tiny()
    fa.attach_router(model, fa.RouterConfig(**SMALL))
    return model.eval(), ref


def test_synthetic_examples_hit_their_lengths_and_are_deterministic(tok):
    # Byte-level tokens: the fixed part of some tasks (several needles or passages) needs ~1K.
    short = ["passkey", "kv_retrieval", "variable_tracking"]
    a = suite.synthetic_examples(tok, short, [400, 1200], 2, seed=7)
    a += suite.synthetic_examples(tok, ["summary", "continuation", "multikey_needle"], [1200], 2, seed=7)
    b = suite.synthetic_examples(tok, short, [400, 1200], 2, seed=7)
    assert [(e.prompt, e.answer) for e in a[:12]] == [(e.prompt, e.answer) for e in b]
    assert len(a) == 3 * 2 * 2 + 3 * 2
    for e in a:
        assert 0.85 * e.length <= len(e.prompt) <= e.length, (e.task, e.length, len(e.prompt))
        assert e.answer[-1] == tok.eos_token_id and e.text_tokens == len(e.answer) - 1
        want = " ".join(e.references) if e.task == "variable_tracking" else e.references[0]
        assert tok.decode(e.answer[:e.text_tokens]) == want
    c = suite.synthetic_examples(tok, ["passkey"], [400], 1, seed=8)[0]
    assert c.prompt != a[0].prompt  # another seed, another context
    with pytest.raises(ValueError, match="unknown synthetic task"):
        suite.synthetic_examples(tok, ["riddles"], [400], 1)
    with pytest.raises(ValueError, match="at most 100 tokens"):
        suite.synthetic_examples(tok, ["summary"], [100], 1)


def test_fa_scores_match_an_independent_forward_and_generate(routed, tok):
    model, ref = routed
    ex = suite.synthetic_examples(tok, ["kv_retrieval"], [300], 1)[0]
    r = suite.score_example(model, tok, ex, "fa", gen_slack=5)
    ids = torch.tensor([ex.prompt + ex.answer])
    with torch.no_grad():
        logits = ref(ids).logits[0].float()
    p, n = len(ex.prompt), len(ex.answer)
    ans_logits, target = logits[p - 1:p - 1 + n], torch.tensor(ex.answer)
    assert r.token_acc == pytest.approx((ans_logits.argmax(-1) == target).float().mean().item())
    want_nll = torch.nn.functional.cross_entropy(ans_logits, target).item()
    assert r.answer_nll == pytest.approx(want_nll, rel=1e-4)
    want = torch.nn.functional.cross_entropy(logits[:p - 1], ids[0, 1:p], reduction="sum").item()
    assert r.prompt_nll_sum == pytest.approx(want, rel=1e-4) and r.prompt_nll_count == p - 1
    with torch.no_grad():
        gen = ref.generate(torch.tensor([ex.prompt]), max_new_tokens=ex.text_tokens + 5, do_sample=False,
                           eos_token_id=tok.eos_token_id, pad_token_id=0)
    assert r.generated == tok.decode(gen[0, p:], skip_special_tokens=True)
    assert r.use_sparse == [False, False] and r.sa_fraction == 0.0
    assert r.prefill_s > 0 and (r.decode_s_per_token or 0) > 0


def test_modes_route_as_forced_and_restore_the_config(routed, tok):
    model, _ = routed
    ex = suite.synthetic_examples(tok, ["passkey"], [300], 1)[0]
    before = {i: r.config for i, r in hf.routers(model).items()}
    fa_r, sa_r, flux_r = (suite.score_example(model, tok, ex, m, gen_slack=0) for m in ("fa", "sa", "flux"))
    assert sa_r.use_sparse == [True, True] and sa_r.kv_saved > 0.3
    assert flux_r.use_sparse == [False, False]  # untrained routers are FA-biased
    assert flux_r.answer_nll == fa_r.answer_nll and sa_r.answer_nll != fa_r.answer_nll
    assert {i: r.config for i, r in hf.routers(model).items()} == before
    with pytest.raises(RuntimeError, match="boom"):
        with suite.forced(model, "sa"):
            raise RuntimeError("boom")
    assert {i: r.config for i, r in hf.routers(model).items()} == before
    with pytest.raises(ValueError, match="mode must be one of"):
        suite.score_example(model, tok, ex, "half")


def test_match_is_substring_of_the_generation(routed, tok):
    model, _ = routed
    ex = suite.synthetic_examples(tok, ["passkey"], [300], 1)[0]
    r = suite.score_example(model, tok, ex, "fa", gen_slack=8)
    assert len(r.generated) >= 4
    hit = suite.Example(**{**ex.__dict__, "references": [r.generated[1:4].upper()]})
    miss = suite.Example(**{**ex.__dict__, "references": [r.generated[1:4], "\x00never"]})
    assert suite.score_example(model, tok, hit, "fa", gen_slack=8).match == 1.0
    assert suite.score_example(model, tok, miss, "fa", gen_slack=8).match == 0.0


def test_jsonl_records_are_read_and_cut_to_fit(tmp_path, tok):
    path = tmp_path / "recs.jsonl"
    long_ctx = "".join(f"line {i} of a long context. " for i in range(200))
    path.write_text("\n".join(json.dumps(r) for r in [
        {"context": "The code is 4417.", "question": "What is the code?", "answer": "4417",
         "task": "single_qa"},
        {"context": long_ctx, "question": "What came first?", "answer": "line 0", "task": "my_task"},
    ]) + "\n\n")
    exs = suite.jsonl_examples(tok, str(path), max_tokens=600)
    assert [e.task for e in exs] == ["single_qa", "my_task"]
    assert len(exs[1].prompt) + len(exs[1].answer) <= 600 < len(long_ctx)
    assert [e.length for e in exs] == [600, 600]
    text = tok.decode(exs[1].prompt)
    assert "line 0 of" in text and "line 199 of" in text and "What came first?" in text
    assert suite.task_group("single_qa") == "retrieval" and suite.task_group("my_task") == "other"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x", "answer": "y"}) + "\n")
    with pytest.raises(ValueError, match="line 1 needs string fields"):
        suite.jsonl_examples(tok, str(bad), 600)


def test_summary_tables_and_report_files(routed, tok, tmp_path):
    model, _ = routed
    exs = two_examples(tok)
    results = suite.run_suite(model, tok, exs, ["fa", "flux", "sa"], gen_slack=2, progress=False)
    assert len(results) == 6
    s = report.summarize(results, {"model": "tiny"})
    assert s["tasks"]["passkey"]["group"] == "retrieval" and s["tasks"]["continuation"]["group"] == "holistic"
    assert s["overall"]["sa"]["sa_fraction"] == 1.0 and s["overall"]["fa"]["sa_fraction"] == 0.0
    assert math.isfinite(s["overall"]["flux"]["ppl"]) and s["overall"]["flux"]["ppl"] > 1
    assert set(s["speed"]) == {"300", "1000"} and s["flux_sa_per_layer"]["passkey"] == [0.0, 0.0]
    text = report.format_tables(s)
    for needle in ("passkey", "continuation", "[retrieval-heavy]", "[holistic]", "[all]", "match all-FA",
                   "SA frac Flux", "prefill s", "decode ms/tok"):
        assert needle in text, needle
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": i, "lm_loss": 2.0 / i, "reg_loss": 0.1,
                                             "sa_fraction_per_task": {"single_qa": 0.1 * i}})
                                 for i in range(1, 6)))
    written = report.write_report(s, str(tmp_path / "out"), metrics_file=str(metrics))
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["report.md", "results.json", "routing_heatmap.png", "speed.png", "training.png"]
    for p in written:
        if p.endswith(".png"):
            with open(p, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| passkey |" in md and "![Speed](speed.png)" in md
    assert json.loads((tmp_path / "out" / "results.json").read_text())["meta"]["model"] == "tiny"


@pytest.mark.parametrize("args,message", [
    (["--tasks", "riddles"], "unknown synthetic task"),
    (["--lengths", "0"], "--lengths: each length"),
    (["--lengths", "1k"], "--lengths: each length"),
    (["--speed-lengths", "16"], "--speed-lengths: each length"),
    (["--speed-task", "riddles"], "--speed-task: unknown synthetic task"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--modes", "fa,bogus"], "--modes: unknown mode"),
    (["--jsonl", "/nonexistent/x.jsonl"], "--jsonl: /nonexistent/x.jsonl is not a file"),
    (["--router", "/nonexistent/r.safetensors"], "--router: /nonexistent/r.safetensors does not exist"),
    (["--pattern", "30,4,32"], "--pattern: RouterConfig.sink_tokens must be a multiple"),
    (["--pattern", "32,4"], "--pattern must be SINK,LOCAL_BLOCKS,BLOCK_SIZE"),
    (["--gen-slack", "-1"], "--gen-slack must be >= 0"),
])
def test_cli_argument_errors(args, message, capsys):
    assert cli(["--model", "/nonexistent/model"] + args) == 2
    assert message in capsys.readouterr().err


def test_cli_cuda_without_a_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: --device cuda is valid here")
    assert cli(["--model", "smollm2", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_cli_end_to_end_on_a_saved_tiny_model(tmp_path, tok, capsys):
    model_dir = tmp_path / "model"
    base = tiny()
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    fa.attach_router(base, fa.RouterConfig(**SMALL))
    fa.save_router(base, str(tmp_path / "router.safetensors"))
    recs = tmp_path / "recs.jsonl"
    rec = {"context": "Remember 12.", "question": "What?", "answer": "12", "task": "qa"}
    recs.write_text(json.dumps(rec) + "\n")
    out = tmp_path / "report"
    assert cli(["--model", str(model_dir), "--router", str(tmp_path / "router.safetensors"),
                "--tasks", "passkey", "--lengths", "300", "--samples", "1", "--jsonl", str(recs),
                "--speed-lengths", "300", "600", "--speed-task", "passkey",
                "--gen-slack", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "passkey" in printed and "qa" in printed and "sink 16, 2 local blocks of 16" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["modes"] == ["fa", "flux", "sa"] and set(res["tasks"]) == {"passkey", "qa"}
    assert {e["length"] for e in res["examples"] if e["task"] == "qa"} == {300}  # cut to --lengths
    assert (out / "routing_heatmap.png").exists() and (out / "speed.png").exists()
    assert set(res["sweep"]) == {"300", "600"} and res["sweep"]["600"]["sa"]["sa_fraction"] == 1.0
    assert "Speed by prompt length" in printed and "vs all-FA" in (out / "report.md").read_text()
    assert cli(["--model", str(model_dir), "--tasks", "passkey", "--lengths", "2000"]) == 2
    assert "exceed the model's limit of 1024" in capsys.readouterr().err
    assert cli(["--model", str(model_dir), "--tasks", "passkey", "--lengths", "300",
                "--speed-lengths", "4096"]) == 2
    assert "lengths [4096] exceed" in capsys.readouterr().err


def test_demo_verdict_reads_the_numbers(routed, tok):
    from flux_attention.eval.demo import _verdict

    model, _ = routed
    exs = two_examples(tok)
    s = report.summarize(suite.run_suite(model, tok, exs, ["fa", "flux"], gen_slack=0, progress=False))
    text = _verdict(s)
    assert "Flux sent 0% of the (layer, sequence) decisions" in text
    assert "(0% on retrieval-heavy tasks, 0% on holistic ones)" in text
    assert "same for every input" in text and "all-FA" in text and "all-SA" not in text
    fa_only = suite.run_suite(model, tok, exs[:1], ["fa"], gen_slack=0, progress=False)
    assert _verdict(report.summarize(fa_only)) == ""


def test_demo_rejects_a_bad_config_override(capsys):
    from flux_attention.eval.demo import main as demo

    assert demo(["--train.stepz=3"]) == 2
    assert "unknown key 'train.stepz'" in capsys.readouterr().err


def test_demo_end_to_end_on_the_tiny_config_stops_at_its_time_budget(tmp_path, capsys):
    from flux_attention.eval.demo import main as demo

    assert demo(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--out", str(tmp_path),
                 "--train.steps=100000", "--max-train-s", "1.5", "--tasks", "passkey", "--lengths", "300",
                 "--samples", "1", "--speed-lengths", "300", "--gen-slack", "2"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"stopped by the time budget after \d+ of 100000 steps", printed)
    (run,) = tmp_path.iterdir()
    names = sorted(p.name for p in run.iterdir())
    for name in ("metrics.jsonl", "report.md", "results.json", "router.safetensors", "routing_heatmap.png",
                 "speed.png", "train_config.yaml", "training.png"):
        assert name in names
    steps = int(re.search(r"after (\d+) of", printed).group(1))
    assert any(p.name == f"step-{steps:08d}" for p in (run / "checkpoint").iterdir())
    base = tiny()
    assert fa.load_router(base, str(run / "router.safetensors")).loaded == 24
    assert demo(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--tasks", "riddles"]) == 2
    assert "unknown synthetic task" in capsys.readouterr().err
    assert demo(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--modes", "fa", "half"]) == 2
    assert "--modes: choose from fa, flux, sa" in capsys.readouterr().err
    assert "# Flux Attention demo: random on cpu" in (run / "report.md").read_text()
