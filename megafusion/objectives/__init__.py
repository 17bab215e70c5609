"""Training objectives (one module each, see :mod:`megafusion.objectives.spec` and ``registry``):
the next-token LM loss (``lm``), Transfusion (``transfusion``: LM + diffusion on image latents),
and the diffusion schedules and samplers it uses."""
