"""Build-time invariants that need no compiler: the committed per-instantiation CUDA files are
exactly what csrc/cuda/generate_instantiations.py writes."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_instantiation_files_are_generated():
    script = os.path.join(ROOT, "csrc", "cuda", "generate_instantiations.py")
    r = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert r.returncode == 0, f"csrc/cuda/inst/ is stale: run `python {os.path.relpath(script, ROOT)}`\n{r.stdout}{r.stderr}"
