"""The caption-dropout key that every objective with captioned images shares (torch-free):
``objective.caption_dropout``, the fraction of captioned images trained without their caption, the
unconditional view that classifier-free guidance samples from.

One key, declared here once and inherited by each objective's options dataclass (the config
schema accepts a key that two owners inherit from the same declaration). Its default, ``null``,
means the selected objective's own default: Transfusion drops 10% (the paper), the LM objective
none (so that an LM run that does not ask for it trains exactly as before the key existed).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CaptionDropoutConfig:
    # Fraction of captioned images trained without their caption: their image tokens and their
    # <boi> see only <bos>, <boi> and the image (the unconditional view of classifier-free
    # guidance). null = the objective's default (transfusion 0.1, lm 0).
    caption_dropout: float | None = None


def caption_dropout_rate(objective, default: float) -> float:
    """The rate the run trains with: ``objective.caption_dropout``, or the objective's ``default``."""
    rate = objective.caption_dropout
    return default if rate is None else float(rate)


def caption_dropout_problems(cfg) -> list[str]:
    rate = cfg.objective.caption_dropout
    if rate is not None and not 0 <= rate < 1:
        return [f"objective.caption_dropout={rate} must be in [0, 1): e.g. 0.1 (or null: the objective's default)"]
    return []
