#!/usr/bin/env bash
# Everything megafusion owes a GPU, in one call: the fused
# kernels checked in bf16 against the per-group loop and timed against one dense GEMM
# (bench.kernels), then one MoT layer and one MoMa layer against dense, with the Triton kernels and
# with the torch reference (bench.mot_layer / bench.moma_layer, which need megatron-core: wheels
# in .whl/ are installed first, for a machine without a package index), and, on 2+ GPUs, the
# context-parallel attention at 32k tokens (bench.cp_attention --gpu). Results (JSON + logs) go to $OUT, default
# bench/results/gpu; copy them into bench/results and re-render the tables with --table-only.
#   bash bench/gpu_suite.sh            # on the GPU machine, from the repository root
set -euo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# 1. kernels: bf16, the problems at 8k and 32k tokens (64k: add --tokens 65536)
python3 -m bench.kernels --tokens 8192 32768 --iters 10 --warmup 3 --out "$OUT/kernels_gpu.json" 2>&1 | tee "$OUT/kernels.log"
# 2. layers (need megatron-core): MoT with the kernels, then with the torch reference; MoMa with the kernels
if python3 -c "import megatron.core" 2> /dev/null; then
  for backend in triton torch; do
    python3 -m bench.mot_layer --ops-backend "$backend" --iters 30 --warmup 10 \
      --out "$OUT/mot_layer_gpu_$backend.json" 2>&1 | tee "$OUT/mot_layer_$backend.log"
  done
  python3 -m bench.moma_layer --ops-backend triton --iters 30 --warmup 10 --out "$OUT/moma_layer_gpu_triton.json" 2>&1 |
    tee "$OUT/moma_layer.log"
else
  echo "megatron-core is not importable: layer benchmarks skipped (put its wheels in .whl/)" |
    tee "$OUT/layers_skipped.txt"
fi
# 3. context-parallel attention at 8k-32k tokens (bf16, flex): one rank per GPU, so only where the
#    machine has 2 or more (a one-GPU machine cannot run CP=2; the script says so and goes on)
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && python3 -c "import megatron.core" 2> /dev/null; then
  python3 -m bench.cp_attention --gpu --out "$OUT/cp_attention_gpu.json" 2>&1 | tee "$OUT/cp_attention.log"
else
  echo "bench.cp_attention --gpu skipped: it needs 2+ GPUs (one per CP rank) and megatron-core" |
    tee "$OUT/cp_attention_skipped.txt"
fi
