"""Host-only check of the sm90 attention backward's CuTe layout algebra (no GPU needed):
tests/cuda/sm90_bwd_layouts.cu, built with nvcc by scripts/check_sm90_bwd_layouts.sh. It checks that
the S^T accumulator read as the register A operand of dV / dK holds exactly the (key, query)
elements CuTe's A partition expects, the adjacent-column pairs the epilogues store, the mask's
column enumeration, the dQ accumulator's coverage and the transposed shared-memory views."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sm90_bwd_layouts():
    if shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        pytest.skip("nvcc not found: the layout check compiles CuTe host code")
    try:
        import cutlass_library  # noqa: F401
    except ImportError:
        if not os.environ.get("CUTLASS_DIR"):
            pytest.skip("no CUTLASS headers (nvidia-cutlass wheel or CUTLASS_DIR)")
    env = dict(os.environ, PY=sys.executable)
    env["PATH"] = env.get("PATH", "") + ":/usr/local/cuda/bin"
    res = subprocess.run([os.path.join(ROOT, "scripts", "check_sm90_bwd_layouts.sh")], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0 and "sm90 bwd layouts: PASS" in res.stdout, res.stdout + res.stderr
