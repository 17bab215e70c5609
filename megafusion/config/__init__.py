"""megafusion.config: typed run configuration, YAML/CLI loading and validation.

Pure Python (no torch, no megatron): it runs before any process group exists.

    path, overrides = parse_cli(sys.argv[1:])
    cfg = load_config(path, overrides)
    validate(cfg, world_size)
"""

from .loader import apply_overrides, config_from_dict, load_config, parse_cli
from .schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
)
from .validate import ATTENTION_BACKENDS, PARAMS_DTYPES, validate

__all__ = [
    "Config",
    "ConfigError",
    "ParallelConfig",
    "ModelConfig",
    "TrainConfig",
    "DataConfig",
    "CheckpointConfig",
    "EvalConfig",
    "LoggingConfig",
    "load_config",
    "parse_cli",
    "apply_overrides",
    "config_from_dict",
    "validate",
    "PARAMS_DTYPES",
    "ATTENTION_BACKENDS",
]
