#!/usr/bin/env bash
# Example submission: 8 nodes of 8x H100 80GB SXM (NVLink 4 / NVSwitch inside a node,
# 8x 400 Gb/s InfiniBand NDR between nodes).
#
#   launch/slurm/examples/8xH100.sh                  # submit (run from the repository root)
#   launch/slurm/examples/8xH100.sh --dry-run        # print layout + srun/torchrun command, submit nothing
#   launch/slurm/examples/8xH100.sh train.steps=100  # extra overrides are appended and win
#
# Layout: world 64 = tp 8 (one node, over NVLink) x pp 4 (four nodes per pipeline) x dp 2,
#         interleaved with vpp 3 to shrink the pipeline bubble; sequence parallel and the
#         distributed optimizer on.
# Model:  examples/configs/tiny_dense.yaml is the only config in the repository, so the
#         overrides below blow it up to a ~30B Llama-style shape (48 layers, hidden 7168,
#         56 heads / 8 kv heads, SwiGLU 20480, 32k vocab, 4k context) in bf16.
#         CHANGE: point CONFIG at your own YAML and drop the model.* overrides.
# Batch:  global 512 sequences x 4096 tokens = 2M tokens per step: micro 1 x dp 2 x 256
#         microbatches (a multiple of pp, as the interleaved schedule needs).
# H100 peak for MFU: logging.peak_tflops=989 (dense bf16, SXM).
# To change: NODES (world = NODES x 8: dp grows, keep NODES a multiple of pp=4), SBATCH_ARGS
# (partition / account / time for your site), the data.* keys for real data.
set -euo pipefail

NODES=${NODES:-8}
CONFIG=${CONFIG:-examples/configs/tiny_dense.yaml}
SBATCH_ARGS=(--job-name=megafusion-h100 --time=48:00:00)  # CHANGE: add --partition=... --account=...
OVERRIDES=(
  # parallel layout: TP inside the node, PP across nodes
  parallel.tp=8 parallel.pp=4 parallel.vpp=3 parallel.sp=true parallel.distributed_optimizer=true
  # ~30B dense model (CHANGE: remove when CONFIG describes your model)
  model.num_layers=48 model.hidden_size=7168 model.num_attention_heads=56 model.num_query_groups=8
  model.ffn_hidden_size=20480 model.vocab_size=32000 model.seq_length=4096
  model.params_dtype=bf16 model.attention_backend=auto
  # optimisation
  train.micro_batch_size=1 train.global_batch_size=512 train.steps=100000
  train.lr=1.2e-4 train.min_lr=1.2e-5 train.warmup_steps=2000
  # checkpoints survive resubmission when out_dir is fixed (CHANGE the name per experiment)
  logging.out_dir=runs/h100-30b checkpoint.interval=1000 logging.log_interval=10 logging.peak_tflops=989
)

if [[ "${1:-}" == "--dry-run" ]]; then
  shift
  NNODES=$NODES GPUS_PER_NODE=8 exec bash launch/slurm/train.sbatch --dry-run --config "$CONFIG" "${OVERRIDES[@]}" "$@"
fi
mkdir -p logs  # sbatch --output=logs/%x-%j.out needs it to exist
exec ${SBATCH:-sbatch} --nodes="$NODES" --gpus-per-node=8 "${SBATCH_ARGS[@]}" \
  launch/slurm/train.sbatch --config "$CONFIG" "${OVERRIDES[@]}" "$@"
