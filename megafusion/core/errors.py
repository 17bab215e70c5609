"""The errors a user can act on. Every command catches ``MegafusionError`` once and prints its
message as one line (no traceback unless ``MEGAFUSION_DEBUG=1``); each message names the
thing at fault (key, file, checkpoint) and the fix."""

from __future__ import annotations


class MegafusionError(Exception):
    """Bad input or an unusable resource; the message says what and how to fix it."""


class ConfigError(MegafusionError, ValueError):
    """A config that cannot work: the message names the key and the fix."""


class DataError(MegafusionError, ValueError):
    """Bad input data: the message names the file (and line / member) and what is wrong."""


class CheckpointError(MegafusionError, RuntimeError):
    """A checkpoint that cannot be used: the message names the directory and what is wrong."""


class ConversionError(MegafusionError, RuntimeError):
    """A model that cannot be converted (Hugging Face import/export, family conversions)."""


class MissingDependencyError(MegafusionError, RuntimeError):
    """An optional package the run asked for is not installed: the message names the install."""


class UsageError(MegafusionError, ValueError):
    """Command-line arguments that cannot work together: the message names the flag."""


class NumericsError(MegafusionError, ArithmeticError):
    """A non-finite loss or gradient norm: the message names the step, microbatch and modality."""
