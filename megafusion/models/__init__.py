"""Model families as megatron-core layer specs, and the registry that assembles them."""
