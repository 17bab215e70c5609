"""Experiments that train several models and compare them: one folder each, run as modules from the
repository root (``python -m examples.experiments.<name>.run``); :mod:`examples.experiments.harness`
holds what they share."""
