"""Names a config may choose from, read by config validation (which must not import torch) and
by the registries that build them (which check at import that they agree with these lists)."""

IMAGE_CODECS = ("pixel", "vq", "vqgan")
LATENT_CODECS = ("pixels", "kl")
PARAMS_DTYPES = ("auto", "fp32", "bf16")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "te")
DATA_SOURCES = ("synthetic", "builtin", "indexed")
# data.attention: whether a token attends the earlier documents of its packed row (megafusion/layers/masks.py)
DOCUMENT_ATTENTION = ("isolated", "causal")
# data.positions: each token's RoPE position, its row index or its position within its document
TOKEN_POSITIONS = ("row", "document")
BUILTIN_SETS = ("shapes", "digits", "arithmetic", "facts")  # data.builtin (megafusion/data/builtin/)
DATA_ORDERS = ("input", "random", "icp")  # data.order: how built-in documents fill rows (data/order.py)
MOT_PARTS = ("attention", "ffn", "norms")
# ops.backend: who runs the grouped GEMMs of MoT and the experts (megafusion/ops/backends.py)
OPS_BACKENDS = ("auto", "triton", "torch_grouped_mm", "torch")
# train.recompute: activation recomputation (megatron-core's recompute_granularity; none keeps every
# activation, selective recomputes core attention, full recomputes each transformer layer)
RECOMPUTE_MODES = ("none", "selective", "full")
# train.trainable: what the optimizer trains (all; or only the auxiliary routers, the rest frozen:
# the second stage after a trained model, megafusion/layers/aux_router.py)
TRAINABLE = ("all", "aux_routers")
MOE_DISPATCHERS = ("alltoall", "allgather")  # megatron-core token dispatchers that keep every routed token
# Signals train.stop_signals may name (SLURM sends SIGTERM on preemption, --signal=B:USR1@T before
# the time limit); SIGINT stays Ctrl-C, an immediate stop.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")
# The small U-Net of objective.patchify=unet: block widths (each block after the first halves
# the latent) and resnet layers per block. Here, not in layers/patchify.py, so that validation
# can check objective.latent_patch_size against the downsampling before anything is built.
UNET_CHANNELS = (32, 64)
UNET_LAYERS_PER_BLOCK = 1
MOD_SPLITS = ("global", "per_modality")  # where Mixture-of-Depths selects: a row's tokens, or per modality
