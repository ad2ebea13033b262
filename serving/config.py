"""The server's config file: FasterTransformer `config.pbtxt` knobs mapped onto gptjax's EngineConfig.

A TOML (or JSON) file with up to three tables, every key optional:

    [fastertransformer]      # the knobs of the FasterTransformer backend's config.pbtxt
    top_k = 1                # -> EngineConfig.top_k (also read as candidate_num)
    top_p = 0.0              # -> EngineConfig.top_p; 0 means off, as in FasterTransformer (also probability_threshold)
    tensor_para_size = 8     # -> EngineConfig.mesh.tensor
    layer_para_size = 1      # -> EngineConfig.mesh.stage
    max_seq_len = 1024       # -> EngineConfig.max_seq_len (KV cache length per slot)
    batch_size = 8           # -> EngineConfig.max_slots and EngineConfig.max_batch_size
    is_half = 1              # -> dtype float16 when --dtype is not given
    head_num = 16            # checked against the loaded model (n_heads)
    size_per_head = 64       # checked against the loaded model (hidden / n_heads)
    vocab_size = 50257       # checked against the loaded model
    decoder_layers = 24      # checked against the loaded model (n_layers)
    is_fuse_QKV = 1          # accepted: gptjax always computes Q, K and V in one matmul

    [engine]                 # any EngineConfig field; wins over [fastertransformer]
    max_slots = 16
    decode_steps_per_call = 4
    batch_window_ms = 2.0    # an idle server waits this long for more requests, to prefill them together
    max_prefill_tokens = 8192  # padded prompt tokens in one prefill: bounds the shapes compiled at start

    [server]
    drain_timeout_s = 30     # on SIGTERM, how long in-flight requests may take before they are cut off

Triton's own `config.pbtxt` (`parameters { key: "top_k" value: { string_value: "1" } } ...`) is read too, by
suffix `.pbtxt`. `layer_para_batch_size`, `model_type`, `model_checkpoint_path` and the like are accepted and
have no effect (the model comes from --model or --checkpoint).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from gptjax.config import EngineConfig, MeshShape, ModelConfig, engine_config_from_dict, load_file

# knobs that shape the engine; the values are ints or floats
FT_ENGINE_KNOBS = ("top_k", "top_p", "tensor_para_size", "layer_para_size", "max_seq_len", "batch_size",
                   "is_half", "is_fuse_QKV")
# knobs that describe the model: checked against the model that was loaded
FT_MODEL_KNOBS = {"head_num": "n_heads", "size_per_head": "head_dim", "vocab_size": "vocab_size",
                  "decoder_layers": "n_layers"}
FT_ALIASES = {"candidate_num": "top_k", "probability_threshold": "top_p"}
# accepted for compatibility, no effect here
FT_IGNORED = ("layer_para_batch_size", "model_type", "model_name", "model_checkpoint_path", "data_type",
              "int8_mode", "enable_custom_all_reduce", "pipeline_para_size", "shared_contexts_ratio")


class ConfigError(ValueError):
    """A bad config file (the CLI exits 2 with this message)."""


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    dtype: str | None = None  # from is_half; --dtype wins
    expected_model: dict = field(default_factory=dict)  # ModelConfig attribute -> value the file asked for
    drain_timeout_s: float = 30.0
    source: str = ""

    def check_model(self, model: ModelConfig) -> None:
        """Raise ConfigError naming every model-shape knob that the loaded model contradicts."""
        wrong = [f"{name}={want} but the model has {getattr(model, name)}"
                 for name, want in self.expected_model.items() if getattr(model, name) != want]
        if wrong:
            raise ConfigError(f"{self.source}: the config does not match the loaded model: {'; '.join(wrong)}")


def _number(value, key: str, source: str, kind=int):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    return number


def _map_fastertransformer(ft: dict, source: str) -> tuple[dict, dict, str | None]:
    """FasterTransformer knobs -> (EngineConfig changes, expected model shape, dtype)."""
    engine, expected, dtype = {}, {}, None
    ft = {FT_ALIASES.get(k, k): v for k, v in ft.items()}
    unknown = sorted(set(ft) - set(FT_ENGINE_KNOBS) - set(FT_MODEL_KNOBS) - set(FT_IGNORED))
    if unknown:
        raise ConfigError(f"{source}: unknown [fastertransformer] key(s): {', '.join(unknown)}")
    if "top_k" in ft:
        engine["top_k"] = _number(ft["top_k"], "top_k", source)
    if "top_p" in ft:
        top_p = _number(ft["top_p"], "top_p", source, float)
        engine["top_p"] = 1.0 if top_p == 0 else top_p  # FasterTransformer's 0 turns top-p off
    mesh = {}
    if "tensor_para_size" in ft:
        mesh["tensor"] = _number(ft["tensor_para_size"], "tensor_para_size", source)
    if "layer_para_size" in ft:
        mesh["stage"] = _number(ft["layer_para_size"], "layer_para_size", source)
    if mesh:
        engine["mesh"] = mesh
    if "max_seq_len" in ft:
        engine["max_seq_len"] = _number(ft["max_seq_len"], "max_seq_len", source)
    if "batch_size" in ft:
        engine["max_slots"] = engine["max_batch_size"] = _number(ft["batch_size"], "batch_size", source)
    if "is_half" in ft:
        half = _number(ft["is_half"], "is_half", source)
        if half not in (0, 1):
            raise ConfigError(f"{source}: is_half must be 0 or 1, got {ft['is_half']!r}")
        dtype = "float16" if half else "float32"
    if "is_fuse_QKV" in ft and _number(ft["is_fuse_QKV"], "is_fuse_QKV", source) not in (0, 1):
        raise ConfigError(f"{source}: is_fuse_QKV must be 0 or 1, got {ft['is_fuse_QKV']!r}")
    for knob, attr in FT_MODEL_KNOBS.items():
        if knob in ft:
            expected[attr] = _number(ft[knob], knob, source)
    return engine, expected, dtype


def _read_pbtxt(path: Path) -> dict:
    """The `parameters` of a Triton config.pbtxt, as a [fastertransformer] table."""
    text = path.read_text()
    pairs = re.findall(r'key\s*:\s*"([^"]+)"\s*value\s*:?\s*\{\s*string_value\s*:\s*"([^"]*)"\s*\}', text)
    ft = {}
    for key, value in pairs:
        try:
            ft[key] = float(value) if "." in value else int(value)
        except ValueError:
            ft[key] = value
    return {"fastertransformer": ft}


def server_config_from_dict(data: dict, source: str = "config") -> ServerConfig:
    unknown = sorted(set(data) - {"fastertransformer", "engine", "server"})
    if unknown:
        raise ConfigError(f"{source}: unknown table(s): {', '.join(unknown)} "
                          "(expected [fastertransformer], [engine], [server])")
    engine_changes, expected, dtype = _map_fastertransformer(dict(data.get("fastertransformer", {})), source)
    engine_table = dict(data.get("engine", {}))
    if "mesh" in engine_changes and "mesh" in engine_table:
        mesh = engine_table["mesh"]
        mesh = dataclasses.asdict(MeshShape.parse(mesh)) if isinstance(mesh, str) else dict(mesh)
        engine_table["mesh"] = {**engine_changes["mesh"], **mesh}
    try:
        engine = engine_config_from_dict({**engine_changes, **engine_table}, source)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None
    server = dict(data.get("server", {}))
    unknown = sorted(set(server) - {"drain_timeout_s"})
    if unknown:
        raise ConfigError(f"{source}: unknown [server] key(s): {', '.join(unknown)}")
    drain = _number(server.get("drain_timeout_s", 30.0), "drain_timeout_s", source, float)
    if drain < 0:
        raise ConfigError(f"{source}: drain_timeout_s must not be negative, got {drain}")
    return ServerConfig(engine=engine, dtype=dtype, expected_model=expected, drain_timeout_s=drain, source=source)


def server_config_from_file(path: str | Path) -> ServerConfig:
    """Read a TOML, JSON or Triton config.pbtxt file; raise ConfigError (a ValueError) naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = _read_pbtxt(path) if path.suffix == ".pbtxt" else load_file(path)
    except ValueError as e:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table at the top level")
    return server_config_from_dict(data, str(path))
