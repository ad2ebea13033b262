"""What `gptjax serve` runs with: the engine's EngineConfig, the SchedulerConfig and the ServerConfig, read from
one file whose FasterTransformer backend `config.pbtxt` knobs map onto them.

Triton's own `config.pbtxt` (by suffix `.pbtxt`) loads unchanged, in the backend's v1 (2021) and 5.x forms:
its `parameters` are read as the [fastertransformer] table below; its top-level `max_batch_size` becomes
ServerConfig.max_batch_size (rows in one KServe request), and its declared `input` names decide the dialect
that model metadata and config describe (`INPUT_ID`: v1, `input_ids`: 5.x, none declared: 5.x). Requests of
either dialect are served whatever the config declares: a request's own tensor names pick its dialect.

Or a TOML (or JSON) file with up to four tables, every key optional:

    [fastertransformer]      # every key of the backend's v1 and 5.x example configs
    top_k = 1                # -> EngineConfig.top_k (v1: candidate_num)
    top_p = 0.0              # -> EngineConfig.top_p; 0 means off, as in FasterTransformer (v1: probability_threshold)
    temperature = 1.0        # -> EngineConfig.temperature
    end_id = 50256           # -> EngineConfig.eos_token_id
    tensor_para_size = 8     # -> EngineConfig.mesh.tensor
    layer_para_size = 1      # -> EngineConfig.mesh.stage (5.x: pipeline_para_size)
    max_seq_len = 1024       # -> EngineConfig.max_seq_len (KV cache length per slot)
    batch_size = 8           # -> EngineConfig.max_slots (and ServerConfig.max_batch_size, unless given)
    is_half = 1              # -> dtype float16 when --dtype is not given (5.x: data_type = "fp16" / "bf16" / "fp32")
    head_num = 16            # checked against the loaded model: n_heads
    size_per_head = 64       #   head_dim
    decoder_layers = 24      #   n_layers
    inter_size = 4096        #   ffn_hidden
    vocab_size = 50304       #   vocab_size, or that vocabulary padded as Megatron pads it (50257 -> 50304)
    repetition_penalty = 1.0 # accepted only at gptjax's own behaviour: repetition_penalty 1, beam_width 1,
                             #   int8_mode 0, model_type "GPT"; any other value is refused, naming the key
    is_fuse_QKV = 1          # accepted, no effect (listed in FT_NO_EFFECT, with why)

    [engine]                 # any EngineConfig field (gptjax/config.py); wins over [fastertransformer]
    max_slots = 16
    max_prefill_tokens = 8192  # padded prompt tokens in one prefill: bounds the shapes compiled at start

    [scheduler]              # any SchedulerConfig field
    decode_steps_per_call = 4
    batch_window_ms = 2.0    # an idle server waits this long for more requests, to prefill them together
    max_queued_requests = 256

    [server]                 # any ServerConfig field but the addresses (--host, --port, ... and --api-key)
    max_batch_size = 64      # rows in one KServe request; wins over [fastertransformer]
    drain_timeout_s = 30     # on SIGTERM, how long in-flight requests may take before they are cut off
    dialect = "v1"           # the FasterTransformer dialect model metadata describes: "v1" or "5.x" (default)

Any other key is refused: the CLI exits 2 with one line naming it (and the table it belongs in).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from gptjax.config import EngineConfig, MeshShape, ModelConfig, check_positive, config_from_dict, load_file
from gptjax.planning import cdiv
from serving import pbtxt

GRPC_INT_MAX = 2**31 - 1  # the largest value of a gRPC channel argument
DIALECTS = ("v1", "5.x")
DEFAULT_DIALECT = "5.x"
DIALECT_MARKERS = {"INPUT_ID": "v1", "input_ids": "5.x"}  # the prompt tensor's name in each dialect

FT_ALIASES = {"candidate_num": "top_k", "probability_threshold": "top_p", "pipeline_para_size": "layer_para_size"}
# knob -> EngineConfig field (ints unless listed in FT_FLOATS)
FT_ENGINE = {"top_k": "top_k", "top_p": "top_p", "temperature": "temperature", "end_id": "eos_token_id",
             "max_seq_len": "max_seq_len", "batch_size": "max_slots"}
FT_FLOATS = ("top_p", "temperature", "repetition_penalty", "len_penalty", "beam_search_diversity_rate",
             "shared_contexts_ratio")
# knob -> ModelConfig attribute it must match
FT_MODEL = {"head_num": "n_heads", "size_per_head": "head_dim", "vocab_size": "vocab_size",
            "decoder_layers": "n_layers", "inter_size": "ffn_hidden"}
# knobs that ask for what gptjax does anyway: accepted at that value, refused at any other
FT_NEUTRAL = {"repetition_penalty": (1.0, "repetition penalty is not supported"),
              "beam_width": (1, "beam search is not supported"),
              "int8_mode": (0, "int8 weights are not supported"),
              "model_type": ("GPT", "gptjax serves GPT models only")}
# knobs accepted with no effect, and why
FT_NO_EFFECT = {
    "is_fuse_QKV": "gptjax always computes Q, K and V in one matmul",
    "enable_custom_all_reduce": "XLA picks the collectives",
    "layer_para_batch_size": "the engine splits its own pipeline micro-batches",
    "max_input_len": "a prompt may fill max_seq_len - 1 positions; nothing is allocated per input length",
    "start_id": "prompts are never empty, so no start token is inserted",
    "len_penalty": "it only acts in beam search (beam_width 1 here)",
    "beam_search_diversity_rate": "it only acts in beam search (beam_width 1 here)",
    "shared_contexts_ratio": "prompts are not shared between requests",
    "model_name": "the model is the one --model or --checkpoint gives",
    "model_checkpoint_path": "the weights come from --model or --checkpoint (`gptjax convert ft` reads a c-model)",
}
FT_DATA_TYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
FT_KNOWN = {*FT_ENGINE, *FT_MODEL, *FT_NEUTRAL, *FT_NO_EFFECT, "tensor_para_size", "layer_para_size", "is_half",
            "data_type"}
FT_01 = ("is_half", "is_fuse_QKV", "enable_custom_all_reduce")
FT_TEXT = ("model_type", "model_name", "model_checkpoint_path", "data_type")
# (low, high) of the knobs whose range is not "an integer >= 1" (floats: any finite value unless listed)
FT_RANGES = {"top_p": (0.0, 1.0), "temperature": (0.0, None), "shared_contexts_ratio": (0.0, 1.0),
             **{k: (0, None) for k in ("top_k", "end_id", "start_id", "int8_mode", *FT_01)}}
MEGATRON_VOCAB_MULTIPLE = 128  # Megatron pads the vocabulary to a multiple of this x its tensor-parallel size


class ConfigError(ValueError):
    """A bad config file (the CLI exits 2 with this message)."""


def megatron_padded_vocab(vocab_size: int, tensor_para_size: int) -> int:
    multiple = MEGATRON_VOCAB_MULTIPLE * tensor_para_size
    return cdiv(vocab_size, multiple) * multiple


def padded_vocab_sizes(vocab_size: int, tensor_para_size: int) -> list[int]:
    """The sizes a checkpoint of this vocabulary may carry: Megatron's padding for the training run's
    tensor-parallel size, which need not be the serving one (the 345M model: 50304 at any serving size)."""
    sizes = {megatron_padded_vocab(vocab_size, 2**i) for i in range(8)}
    sizes.add(megatron_padded_vocab(vocab_size, tensor_para_size))
    return sorted(sizes)


@dataclass(frozen=True)
class SchedulerConfig:
    """How the engine loop moves requests through the engine's slots."""

    decode_steps_per_call: int = 4  # decode steps per device call (tokens reach clients in groups this size)
    batch_window_ms: float = 2.0  # an idle server waits up to this long for more requests to prefill at once
    max_queued_requests: int = 256  # requests waiting for a slot; more are refused (RESOURCE_EXHAUSTED / 429)

    def __post_init__(self):
        check_positive(self, ("decode_steps_per_call", "max_queued_requests"))
        if not 0.0 <= self.batch_window_ms <= 1000.0:
            raise ValueError(f"SchedulerConfig.batch_window_ms must be in [0, 1000], got {self.batch_window_ms}")

    def replace(self, **changes) -> "SchedulerConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ServerConfig:
    """What process 0 listens with, and the limits that keep it answering."""

    host: str = "127.0.0.1"
    port: int = 8001  # gRPC: the native API and KServe v2
    http_port: int = 8000  # KServe v2 REST, OpenAI, metrics; 0: off
    metrics_port: int = 8002  # metrics alone; 0: off
    api_key: str | None = None  # the bearer key every call but health needs, HTTP and gRPC; None: no key
    max_message_bytes: int = 16 * 1024 * 1024  # one gRPC message or HTTP body
    max_batch_size: int = 64  # rows in one KServe request
    # FasterTransformer requests without runtime_top_p: is top-p off (its greedy, with top_k 0)? Its config's
    # probability_threshold / top_p says (0: off; 1.0: the whole distribution, sampled); None: the engine's
    # top_p of 1.0 is off
    ft_top_p_off: bool | None = None
    drain_timeout_s: float = 30.0  # on SIGTERM, how long in-flight requests may take before they are cut off
    dialect: str = DEFAULT_DIALECT  # the FasterTransformer dialect that model metadata and config describe
    stream_idle_timeout_s: float = 30.0  # a stream waiting on its client for longer is closed (UNAVAILABLE)
    max_client_streams: int = 128  # streams at the client's pace at once (ModelStreamInfer and reflection; as
                                   # many health watches besides)
    reserved_workers: int = 16  # handler threads beyond those the queue, the slots and those streams can hold
    keepalive_time_s: float = 60.0  # ping a connection quiet for this long...
    keepalive_timeout_s: float = 20.0  # ...and close it when the ping is not answered in this long
    max_connection_idle_s: float = 300.0  # close a connection with no call for this long (clients reconnect)
    http_body_timeout_s: float = 60.0  # an HTTP request's body must arrive whole within this long (408 otherwise),
                                       # and its headers (else the connection is closed)
    max_http_requests: int = 1024  # HTTP requests in progress at once (a stream until it ends); past it, 503

    def __post_init__(self):
        check_positive(self, ("max_message_bytes", "max_batch_size", "max_client_streams", "keepalive_time_s",
                              "keepalive_timeout_s", "max_connection_idle_s", "stream_idle_timeout_s",
                              "http_body_timeout_s", "max_http_requests"))
        if self.reserved_workers < 0 or self.drain_timeout_s < 0:
            raise ValueError("ServerConfig.reserved_workers and drain_timeout_s must not be negative")
        # gRPC takes these as C ints (bytes, and milliseconds): a larger value stopped the start with a traceback
        if self.max_message_bytes > GRPC_INT_MAX:
            raise ValueError(f"ServerConfig.max_message_bytes must be at most {GRPC_INT_MAX} (gRPC's limit), got "
                             f"{self.max_message_bytes}")
        for name in ("keepalive_time_s", "keepalive_timeout_s", "max_connection_idle_s"):
            if getattr(self, name) > GRPC_INT_MAX // 1000:
                raise ValueError(f"ServerConfig.{name} must be at most {GRPC_INT_MAX // 1000} s (gRPC's limit), got "
                                 f"{getattr(self, name)}")
        if self.dialect not in DIALECTS:
            raise ValueError(f"ServerConfig.dialect must be one of {', '.join(DIALECTS)}, got {self.dialect!r}")

    def replace(self, **changes) -> "ServerConfig":
        return dataclasses.replace(self, **changes)


ADDRESS_FIELDS = ("host", "port", "http_port", "metrics_port", "api_key")  # flags only: a file shared by hosts
TABLES = {"engine": EngineConfig, "scheduler": SchedulerConfig, "server": ServerConfig}


@dataclass(frozen=True)
class ServingConfig:
    """Everything `gptjax serve` runs with, as one config file (and the command's flags) say it."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    dtype: str | None = None  # from is_half / data_type; --dtype wins
    expected_model: dict = field(default_factory=dict)  # ModelConfig attribute -> value the file asked for
    source: str = ""

    def replace(self, **changes) -> "ServingConfig":
        return dataclasses.replace(self, **changes)

    def check_model(self, model: ModelConfig) -> None:
        """Raise ConfigError naming every model-shape knob (and end_id) that the loaded model contradicts."""
        wrong = []
        for name, want in self.expected_model.items():
            have = getattr(model, name)
            if name == "vocab_size" and want != have:
                padded = padded_vocab_sizes(have, self.engine.mesh.tensor)
                if want not in padded:
                    wrong.append(f"vocab_size={want} but the model has {have} (padded as Megatron pads it: "
                                 f"{', '.join(map(str, padded))})")
            elif want != have:
                wrong.append(f"{name}={want} but the model has {have}")
        if not 0 <= self.engine.eos_token_id < model.vocab_size:
            wrong.append(f"end_id={self.engine.eos_token_id} is outside the model's vocabulary [0, {model.vocab_size})")
        if wrong:
            raise ConfigError(f"{self.source}: the config does not match the loaded model: {'; '.join(wrong)}")


def _number(value, key: str, source: str, kind=int):
    try:
        number = kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{source}: {key} must be {what}, got {value!r}") from None
    if kind is int and isinstance(value, float) and value != number:
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    if kind is float and not math.isfinite(number):
        raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
    return number


def _canonical(ft: dict, source: str) -> dict:
    """Aliases to their canonical keys; refuse unknown keys and an alias that contradicts its key."""
    out, given_as = {}, {}
    for key, value in ft.items():
        name = FT_ALIASES.get(key, key)
        if name not in FT_KNOWN:
            raise ConfigError(f"{source}: unknown [fastertransformer] key {key!r}: it is not a key of the "
                              "FasterTransformer backend's GPT configs")
        if name in out and str(out[name]) != str(value):
            raise ConfigError(f"{source}: {key} = {value!r} contradicts {given_as[name]} = {out[name]!r}")
        out[name], given_as[name] = value, key
    return out


def _checked(ft: dict, source: str) -> dict:
    """Each knob's value as a number of the right kind, within its range."""
    values = {}
    for key, value in ft.items():
        if key in FT_TEXT:
            values[key] = str(value)
            continue
        if isinstance(value, bool) and key not in FT_01:  # int(True) made top_k = true a top_k of 1
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        number = _number(value, key, source, float if key in FT_FLOATS else int)
        if key in FT_01 and number not in (0, 1):
            raise ConfigError(f"{source}: {key} must be 0 or 1, got {value!r}")
        low, high = FT_RANGES.get(key, (None, None) if key in FT_FLOATS else (1, None))
        if (low is not None and number < low) or (high is not None and number > high):
            bound = f"in [{low}, {high}]" if high is not None else f"at least {low}"
            raise ConfigError(f"{source}: {key} must be {bound}, got {value!r}")
        values[key] = number
    return values


def _map_fastertransformer(ft: dict, source: str) -> tuple[dict, dict, str | None]:
    """FasterTransformer knobs -> ({table: changes} for [engine] and [server], expected model shape, dtype)."""
    ft = _checked(_canonical(ft, source), source)
    for key, (want, why) in FT_NEUTRAL.items():
        if key in ft and (ft[key].upper() != want if isinstance(want, str) else ft[key] != want):
            raise ConfigError(f"{source}: {key} = {ft[key]!r} is refused: {why} (only {want!r})")
    engine = {FT_ENGINE[k]: v for k, v in ft.items() if k in FT_ENGINE}
    server = {"max_batch_size": engine["max_slots"]} if "max_slots" in engine else {}
    if "top_p" in engine:  # FasterTransformer's 0 turns top-p off; its 1.0 samples the whole distribution
        server["ft_top_p_off"] = engine["top_p"] == 0
        engine["top_p"] = engine["top_p"] or 1.0
    mesh = {axis: ft[k] for k, axis in (("tensor_para_size", "tensor"), ("layer_para_size", "stage")) if k in ft}
    if mesh:
        engine["mesh"] = mesh
    if "max_input_len" in ft and "max_seq_len" in ft and ft["max_input_len"] >= ft["max_seq_len"]:
        raise ConfigError(f"{source}: max_input_len {ft['max_input_len']} must be below "
                          f"max_seq_len {ft['max_seq_len']}")
    expected = {attr: ft[k] for k, attr in FT_MODEL.items() if k in ft}
    return {"engine": engine, "server": server}, expected, _dtype(ft, source)


def _dtype(ft: dict, source: str) -> str | None:
    """The dtype that data_type (5.x) or is_half (v1) asks for; None when neither is given."""
    dtype = None
    if "data_type" in ft:
        if ft["data_type"].lower() not in FT_DATA_TYPES:
            raise ConfigError(f"{source}: data_type must be one of {', '.join(FT_DATA_TYPES)}, got {ft['data_type']!r}")
        dtype = FT_DATA_TYPES[ft["data_type"].lower()]
    if "is_half" in ft:
        half = "float16" if ft["is_half"] else "float32"
        if dtype is not None and (dtype == "float32") != (half == "float32"):
            raise ConfigError(f"{source}: is_half = {ft['is_half']} contradicts data_type = {ft['data_type']!r}")
        dtype = dtype or half
    return dtype


def _declared(top: dict, source: str) -> dict:
    """A config.pbtxt's top level -> its [server] changes: max_batch_size, and the dialect its inputs declare."""
    server = {}
    if "max_batch_size" in top:
        rows = _number(top["max_batch_size"][-1], "max_batch_size", source)
        if rows < 1:
            raise ConfigError(f"{source}: max_batch_size must be at least 1 (the FasterTransformer tensors have a "
                              f"batch dimension), got {rows}")
        server["max_batch_size"] = rows
    for policy in top.get("model_transaction_policy", []):
        decoupled = policy.get("decoupled", ["false"])[-1] if isinstance(policy, dict) else "false"
        if str(decoupled).lower() != "false":
            raise ConfigError(f"{source}: model_transaction_policy.decoupled = {decoupled} asks for several responses "
                              "a request; this server answers each request once (a stream's requests too)")
    names = [t["name"][-1] for t in top.get("input", []) if isinstance(t, dict) and t.get("name")]
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"{source}: an input's name must be a string, got {name!r}")
    found = {DIALECT_MARKERS[n] for n in names if n in DIALECT_MARKERS}
    if len(found) > 1:
        raise ConfigError(f"{source}: the inputs declare both FasterTransformer dialects (INPUT_ID and input_ids)")
    if names and not found:
        raise ConfigError(f"{source}: the inputs {', '.join(names)} are neither FasterTransformer dialect's "
                          "(v1 declares INPUT_ID, 5.x declares input_ids)")
    if found:
        server["dialect"] = found.pop()
    return server


def _read_pbtxt(path: Path) -> dict:
    """A Triton config.pbtxt -> tables: its parameters as [fastertransformer], its top level as [server]."""
    try:
        top = pbtxt.parse(path.read_text())
    except pbtxt.PbtxtError as e:
        raise ConfigError(f"{path}: {e}") from None
    ft = {}
    for p in top.get("parameters", []):
        try:
            key, value = p["key"][-1], p["value"][-1]["string_value"][-1]
        except (KeyError, IndexError, TypeError):
            raise ConfigError(f"{path}: a parameters entry needs key and value {{ string_value }}: {p!r}") from None
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(f"{path}: a parameters entry's key and string_value must be strings: {p!r}")
        ft[key] = value
    return {"fastertransformer": ft, "server": _declared(top, str(path))}


def _table_of(key: str) -> str | None:
    return next((table for table, cls in TABLES.items() if key in {f.name for f in dataclasses.fields(cls)}), None)


def _checked_table(name: str, table: dict, source: str) -> dict:
    """A file's [engine], [scheduler] or [server] table: a key of another table is refused, saying which."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{name}] must be a table, got {table!r}")
    for key in table:
        home = _table_of(key)
        if name == "server" and key in ADDRESS_FIELDS:
            raise ConfigError(f"{source}: [server] {key} is set by the command's flag (--{key.replace('_', '-')}), "
                              "not by the file")
        if home is not None and home != name:
            raise ConfigError(f"{source}: {key} belongs in the [{home}] table, not [{name}]")
    return table


def _merged_mesh(changes: dict, table: dict) -> dict:
    """A [fastertransformer] mesh and an [engine] mesh, axis by axis ([engine] wins)."""
    if "mesh" not in changes or not isinstance(table.get("mesh"), (str, dict)):
        return table  # (a mesh of another type is refused by EngineConfig, naming it)
    mesh = table["mesh"]
    mesh = MeshShape.given(mesh) if isinstance(mesh, str) else mesh  # only the axes it gives
    return {**table, "mesh": {**changes["mesh"], **mesh}}


def serving_config_from_dict(data: dict, source: str = "config") -> ServingConfig:
    """The tables of a config file -> a ServingConfig (ConfigError naming what is wrong)."""
    unknown = sorted(set(data) - {"fastertransformer", *TABLES})
    if unknown:
        raise ConfigError(f"{source}: unknown table(s): {', '.join(unknown)} "
                          "(expected [fastertransformer], [engine], [scheduler], [server])")
    ft_changes, expected, dtype = _map_fastertransformer(dict(data.get("fastertransformer", {})), source)
    configs = {}
    for name, cls in TABLES.items():
        table = _checked_table(name, dict(data.get(name, {})), source)
        changes = ft_changes.get(name, {})
        try:
            configs[name] = config_from_dict(cls, {**changes, **_merged_mesh(changes, table)}, f"[{name}]")
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None
    batch, scheduler = configs["server"].max_batch_size, configs["scheduler"]
    if batch > scheduler.max_queued_requests and "max_queued_requests" not in data.get("scheduler", {}):
        configs["scheduler"] = dataclasses.replace(scheduler, max_queued_requests=batch)  # a batch is queued whole
    return ServingConfig(**configs, dtype=dtype, expected_model=expected, source=source)


def serving_config_from_file(path: str | Path) -> ServingConfig:
    """Read a TOML, JSON or Triton config.pbtxt file; raise ConfigError (a ValueError) naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix == ".pbtxt":
        return serving_config_from_dict(_read_pbtxt(path), str(path))
    try:
        data = load_file(path)
    except ValueError as e:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table at the top level")
    return serving_config_from_dict(data, str(path))
