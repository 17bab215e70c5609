"""MoT vs dense at equal FLOPs per token (``run``: the runs and the report; ``analyze``: the report)."""
