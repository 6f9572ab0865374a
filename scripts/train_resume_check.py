"""Kill-and-resume check of ``python -m train`` on one device: an uninterrupted run, a run killed
with SIGKILL after ``--kill-after`` steps, its resumption; the losses of the resumed steps must
equal the uninterrupted run's bitwise (the config should set ``train.deterministic: true``).

    python scripts/train_resume_check.py --config configs/tiny_cuda.yaml --out $OUT

Prints a table and writes ``train_resume_check.json`` to ``--out``."""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(path):
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                out[r["step"]] = r["loss"]
    return out


def _start(config, tmp, name, steps, extra):
    args = [sys.executable, "-m", "train", "--config", config, f"--checkpoint.dir={tmp}/{name}/ckpt",
            f"--metrics.file={tmp}/{name}/metrics.jsonl", "--metrics.progress_bar=false",
            f"--train.steps={steps}", *extra]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--kill-after", type=int, default=7)
    p.add_argument("--out", default="")
    args, extra = p.parse_known_args()
    tmp = tempfile.mkdtemp(prefix="resume_check_")
    result = {"config": args.config, "steps": args.steps, "ok": False}
    try:
        straight = _start(args.config, tmp, "straight", args.steps, extra)
        out, _ = straight.communicate(timeout=600)
        if straight.returncode != 0:
            raise RuntimeError(f"uninterrupted run failed:\n{out[-3000:]}")
        ref = _losses(f"{tmp}/straight/metrics.jsonl")
        killed = _start(args.config, tmp, "killed", args.steps, extra)
        while max(_losses(f"{tmp}/killed/metrics.jsonl"), default=0) < args.kill_after:
            if killed.poll() is not None:
                raise RuntimeError(f"run to be killed ended early:\n{killed.stdout.read()[-3000:]}")
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        seen = max(_losses(f"{tmp}/killed/metrics.jsonl"))
        resumed = _start(args.config, tmp, "killed", args.steps, extra)
        out, _ = resumed.communicate(timeout=600)
        if resumed.returncode != 0:
            raise RuntimeError(f"resumed run failed:\n{out[-3000:]}")
        start = next((int(line.split(" at step ")[1]) for line in out.splitlines() if line.startswith("resumed from")), None)
        got = _losses(f"{tmp}/killed/metrics.jsonl")
        compared = list(range((start or 0) + 1, args.steps + 1))
        mismatches = [s for s in compared if got.get(s) != ref.get(s)]
        result.update(killed_after=seen, resumed_from=start, compared_steps=compared,
                      mismatches={s: [ref.get(s), got.get(s)] for s in mismatches},
                      ok=start is not None and bool(compared) and not mismatches, losses=ref)
    except Exception as e:  # reported, not raised: the GPU run is blind and must go on
        result["error"] = f"{type(e).__name__}: {e}"
    print("| check | result |\n|---|---|")
    print(f"| kill after step >= {args.kill_after}, resume from | {result.get('resumed_from')} |")
    print(f"| resumed losses bitwise equal to the uninterrupted run | "
          f"{'yes' if result['ok'] else 'NO'} ({len(result.get('compared_steps', []))} steps compared) |")
    if "error" in result:
        print(f"| error | {result['error'][:500]} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "train_resume_check.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
