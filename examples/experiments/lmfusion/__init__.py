"""LMFusion vs the same MoT from scratch (``run``: the steps and the report; ``analyze``: the report)."""
