"""megafusion: Megatron-style distributed pretraining for mixed-modal early-fusion models.

Layers of the package (each imports only from the ones above it): config, runtime,
ops, layers, models, objectives, data, training / cli. See docs/architecture.md.
"""

__version__ = "0.1.0"
