"""Mixture-of-Transformers' options (torch-free; :mod:`megafusion.core.options`). Its one key,
``model.untie``, is a core model key (MoMa unties attention and norms by it too); what MoT adds is
that with every part untied, each part has a text and an image copy, so LMFusion
(``model.freeze_text``) can freeze the text half. The family itself is :mod:`megafusion.models.mot`."""

from __future__ import annotations

from megafusion.core.choices import MOT_PARTS
from megafusion.core.options import Options


def every_part_untied(cfg) -> bool:
    return set(cfg.model.untied_parts()) == set(MOT_PARTS)


OPTIONS = Options(freezes_text=every_part_untied)
