"""The checkpoint folder format now lives in `gptjax.checkpoint`; this name stays until the converters import
it from there."""

from gptjax.checkpoint import (FORMAT_VERSION, CheckpointError, check_params, expected_shapes, load_checkpoint,
                               read_config, save_checkpoint, to_host_arrays)

__all__ = ["FORMAT_VERSION", "CheckpointError", "check_params", "expected_shapes", "load_checkpoint", "read_config",
           "save_checkpoint", "to_host_arrays"]
