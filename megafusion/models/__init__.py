"""Model families as megatron-core layer specs, and the registry that assembles them.

``ARCHS`` maps each ``model.arch`` name to ``"module:function"`` building its layer spec. It
is resolved lazily so that config validation can list the names without importing
megatron-core.
"""

ARCHS: dict[str, str] = {
    "dense": "megafusion.models.dense:dense_layer_spec",
    "mot": "megafusion.models.mot:mot_layer_spec",
}

# Families whose layers read the per-token modality routing (megafusion.layers.routing).
ROUTED_ARCHS = frozenset({"mot"})
