#!/bin/bash
# The GPU benchmark as run on a lent GPU machine that has JAX but no TensorFlow and no network
# (see README, "GPU mode"). From the repository root, with what that machine lacks beside it:
#   .whl/           wheels of keras and its pure-Python needs (namex, optree) and captcha
#   .devdata/site/  ddddocr 1.6.1's package as it ships, less the two models its default reader
#                   never loads (common.onnx, common_det.onnx), so that it travels
# and $OUT, where the results come back (results.tgz). Runs the synthetic set in GPU mode, and the
# two small-set stand-ins beside it on the same GPU; each stage stops at its time limit, and what it
# finished comes back.
set -u
export PYTHONUNBUFFERED=1 KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache  # evaluate.py and predict.py reuse train.py's compilations
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.devdata/site
results=/tmp/results
mkdir -p "$results"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; git rev-parse HEAD 2>/dev/null
  python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)"; } \
  > "$results/device.txt" 2>&1
timeout "${SMALL_SETS_SECONDS:-420}" python3 bench/small_sets.py --variants after --sets standin_4x20 \
  --out "$results" > "$results/small_sets_4x20.log" 2>&1 &
timeout "${SMALL_SETS_SECONDS:-420}" python3 bench/small_sets.py --variants after --sets standin_5x19 \
  --out "$results" > "$results/small_sets_5x19.log" 2>&1 &
timeout "${SYNTHETIC_SECONDS:-480}" python3 bench/bench.py --mode gpu --sets synthetic --exports \
  --set model.weights=none --out "$results" > "$results/bench_synthetic.log" 2>&1
wait
nvidia-smi >> "$results/device.txt" 2>&1
tar -C "$results" -czf "$OUT/results.tgz" --exclude images --exclude images.partial --exclude '*.keras' \
  --exclude backup --exclude export --exclude "*.npy" --exclude "*.h5" --exclude "*.weights*" .
