"""MoMa vs MoT vs dense at equal active FLOPs (``run``: the runs and the report; ``analyze``: the report)."""
