"""Training loop and its pieces (forward step, optimizer, gradient gathering)."""
