"""The CI's compile-only pass over the CUDA sources.

`make build` compiles every csrc/cuda/**/*.cu (and the CUDA branches of csrc/ops/) whenever nvcc and a
CUDA build of torch are present, which is the case in CI even without a GPU. This script makes that
an explicit, failing check: the extension must report a CUDA build, every .cu file must appear in the
build log, and it prints the compile time of each, slowest first (the budget to watch as the Hopper
kernels grow).
"""

import glob
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    sys.path.insert(0, ROOT)
    import flux_attention

    info = flux_attention.build_info()
    nvcc = shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    if not info.get("cuda"):
        if nvcc and os.environ.get("FLUX_CUDA", "auto") != "0":
            print("cuda-check: FAILED: nvcc is present but the extension was built without CUDA")
            return 1
        print("cuda-check: no CUDA toolkit here; CUDA sources not compiled (set FLUX_CUDA=1 to force)")
        return 0

    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "**", "*.cu"), recursive=True))
    times = {}
    for log in glob.glob(os.path.join(ROOT, "build", "temp.*", ".ninja_log")):
        with open(log) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4 and parts[3].endswith(".o"):
                    times[os.path.basename(parts[3])[: -len(".o")]] = (int(parts[1]) - int(parts[0])) / 1e3
    missing = []
    rows = []
    for src in sources:
        stem = os.path.basename(src)[: -len(".cu")]
        # torch's BuildExtension names objects <stem>.o (or <stem>.cuda.o)
        t = times.get(stem, times.get(stem + ".cuda"))
        if t is None:
            missing.append(os.path.relpath(src, ROOT))
        else:
            rows.append((t, os.path.relpath(src, ROOT)))
    print(f"cuda-check: extension built with CUDA {info.get('cuda_runtime')} for sm_{info.get('cuda_archs')}")
    for t, src in sorted(rows, reverse=True):
        print(f"  {t:7.1f} s  {src}")
    if missing:
        print("cuda-check: FAILED: not in the build log (stale build? run `make clean build`):")
        for m in missing:
            print("  ", m)
        return 1
    print(f"cuda-check: {len(rows)} CUDA sources compiled, {sum(t for t, _ in rows):.0f} s in total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
