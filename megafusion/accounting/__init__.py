"""Parameters, model FLOPs and MFU of a config, one job per module:

- :mod:`~megafusion.accounting.params`: exact parameter counts (the family's copies of each part);
- :mod:`~megafusion.accounting.flops`: model FLOPs per token and per microbatch, and what
  ``FlopCounterMode`` reports;
- :mod:`~megafusion.accounting.image_modules`: the objective's extra modules, measured per image;
- :mod:`~megafusion.accounting.report`: the text ``megafusion flops`` prints;
- :mod:`~megafusion.accounting.mfu`: peak FLOP/s of a device and model FLOPs utilisation.

Nothing here names a model family or an objective: it asks their specs
(:mod:`megafusion.models.spec`, :mod:`megafusion.objectives.spec`).
"""
