"""Parallelism-aware, model-agnostic layers built on megatron-core's parallel linears."""
