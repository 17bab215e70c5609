#!/usr/bin/env bash
# Example submission: 4 nodes of 8x A100 80GB (NVLink/NVSwitch inside a node, InfiniBand between).
#
#   launch/slurm/examples/8xA100.sh                  # submit (run from the repository root)
#   launch/slurm/examples/8xA100.sh --dry-run        # print layout + srun/torchrun command, submit nothing
#   launch/slurm/examples/8xA100.sh train.steps=100  # extra overrides are appended and win
#
# Layout: world 32 = tp 8 (one node, over NVLink) x pp 2 (two nodes per pipeline, over IB)
#         x dp 2, interleaved with vpp 2; sequence parallel and the distributed optimizer on.
# Model:  examples/configs/tiny_dense.yaml is the only config in the repository, so the
#         overrides below blow it up to a ~13B Llama-style shape (40 layers, hidden 5120,
#         40 heads / 8 kv heads, SwiGLU 13824, 32k vocab, 4k context) in bf16.
#         CHANGE: point CONFIG at your own YAML and drop the model.* overrides.
# Batch:  global 512 sequences x 4096 tokens = 2M tokens per step: micro 1 x dp 2 x 256
#         microbatches (a multiple of pp, as the interleaved schedule needs).
# To change: NODES (world = NODES x 8: dp grows, keep NODES a multiple of pp=2), SBATCH_ARGS
# (partition / account / time for your site), the data.* keys for real data.
set -euo pipefail

NODES=${NODES:-4}
CONFIG=${CONFIG:-examples/configs/tiny_dense.yaml}
SBATCH_ARGS=(--job-name=megafusion-a100 --time=48:00:00)  # CHANGE: add --partition=... --account=...
OVERRIDES=(
  # parallel layout: TP inside the node, PP across nodes
  parallel.tp=8 parallel.pp=2 parallel.vpp=2 parallel.sp=true parallel.distributed_optimizer=true
  # ~13B dense model (CHANGE: remove when CONFIG describes your model)
  model.num_layers=40 model.hidden_size=5120 model.num_attention_heads=40 model.num_query_groups=8
  model.ffn_hidden_size=13824 model.vocab_size=32000 model.seq_length=4096
  model.params_dtype=bf16 model.attention_backend=auto
  # optimisation
  train.micro_batch_size=1 train.global_batch_size=512 train.steps=100000
  train.lr=1.5e-4 train.min_lr=1.5e-5 train.warmup_steps=2000
  # checkpoints survive resubmission when out_dir is fixed (CHANGE the name per experiment)
  logging.out_dir=runs/a100-13b checkpoint.interval=1000 logging.log_interval=10
)

if [[ "${1:-}" == "--dry-run" ]]; then
  shift
  NNODES=$NODES GPUS_PER_NODE=8 exec bash launch/slurm/train.sbatch --dry-run --config "$CONFIG" "${OVERRIDES[@]}" "$@"
fi
mkdir -p logs  # sbatch --output=logs/%x-%j.out needs it to exist
exec ${SBATCH:-sbatch} --nodes="$NODES" --gpus-per-node=8 "${SBATCH_ARGS[@]}" \
  launch/slurm/train.sbatch --config "$CONFIG" "${OVERRIDES[@]}" "$@"
