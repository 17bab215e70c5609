"""The LM objective's config keys and checks (torch-free; :mod:`megafusion.core.options`): only
``objective.caption_dropout`` (:mod:`megafusion.objectives.caption_options`), default 0 for this
objective. The objective itself is :mod:`megafusion.objectives.lm`."""

from __future__ import annotations

from dataclasses import dataclass

from megafusion.core.options import Options
from megafusion.objectives.caption_options import CaptionDropoutConfig, caption_dropout_problems

# Discrete image tokens see their caption unless the run asks for dropout: an LM run without the
# key trains exactly as before it existed. Classifier-free guidance at generation needs it > 0.
DEFAULT_CAPTION_DROPOUT = 0.0


@dataclass
class LMConfig(CaptionDropoutConfig):
    pass


OPTIONS = Options(sections={"objective": LMConfig}, problems=caption_dropout_problems)
