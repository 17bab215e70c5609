"""Training objectives: next-token LM loss (with z-loss); diffusion comes later."""
