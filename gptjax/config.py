"""Model and engine configuration: frozen dataclasses, presets by name, JSON/TOML load and save."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes of one value of each (memory planning)
ATTENTION_IMPLS = ("pallas", "xla", "cudnn")
MATMUL_IMPLS = ("pallas", "xla")  # the decode step's small-batch products
ACTIVATIONS = ("gelu_new", "gelu")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a GPT-2/GPT-3 style decoder (learned positions, pre-LayerNorm, GELU, tied embeddings)."""

    n_layers: int
    hidden: int
    n_heads: int
    vocab_size: int = 50257
    n_positions: int = 1024
    ffn_hidden: int = 0  # 0 means 4 * hidden
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"  # GPT-2's tanh approximation; "gelu" is the exact erf form
    dtype: str = "float32"
    init_std: float = 0.02
    init_seed: int = 0  # random weights of a preset come from this seed, so every run gives the same tokens

    def __post_init__(self):
        if self.ffn_hidden == 0:
            object.__setattr__(self, "ffn_hidden", 4 * self.hidden)
        for name in ("n_layers", "hidden", "n_heads", "vocab_size", "n_positions", "ffn_hidden"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden % self.n_heads:
            raise ValueError(f"ModelConfig: hidden {self.hidden} is not divisible by n_heads {self.n_heads}")
        if not 0 < float(self.layer_norm_eps) < float("inf"):  # NaN or <= 0 loads, then every logit is NaN
            raise ValueError(f"ModelConfig.layer_norm_eps must be a positive finite number, got {self.layer_norm_eps}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        c, f, l = self.hidden, self.ffn_hidden, self.n_layers
        per_layer = 4 * c + (3 * c * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c)
        return self.vocab_size * c + self.n_positions * c + l * per_layer + 2 * c


PRESETS: dict[str, ModelConfig] = {
    # the built-in default; its wider init (0.2, not 0.02) keeps random greedy text from repeating one token
    "gpt2-tiny": ModelConfig(n_layers=4, hidden=128, n_heads=8, n_positions=256, init_std=0.2),
    "gpt2-124m": ModelConfig(n_layers=12, hidden=768, n_heads=12),
    "megatron-345m": ModelConfig(n_layers=24, hidden=1024, n_heads=16),
    "gpt3-1.3b": ModelConfig(n_layers=24, hidden=2048, n_heads=16, n_positions=2048),
    "gpt3-6.7b": ModelConfig(n_layers=32, hidden=4096, n_heads=32, n_positions=2048),
    "gpt3-13b": ModelConfig(n_layers=40, hidden=5120, n_heads=40, n_positions=2048),
    "gpt3-175b": ModelConfig(n_layers=96, hidden=12288, n_heads=96, n_positions=2048),
}
DEFAULT_PRESET = "gpt2-tiny"


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class MeshShape:
    """Devices = data x stage x tensor: slots split over data, layers over stage, heads over tensor."""

    data: int = 1
    stage: int = 1
    tensor: int = 1

    @classmethod
    def parse(cls, text: str) -> "MeshShape":
        """Parse `data=2,stage=1,tensor=4` (any subset, any order)."""
        return cls(**cls.given(text))

    @classmethod
    def given(cls, text: str) -> dict[str, int]:
        """The axes that `data=2,tensor=4` gives, and their sizes."""
        sizes, axes = {}, cls.axes()
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = (v.strip() for v in part.partition("="))
            if not sep or name not in axes or not (value.isascii() and value.isdigit()):
                raise ValueError(f"mesh: expected data=D,stage=S,tensor=T, got {text!r}")
            if name in sizes:  # the last one would win silently
                raise ValueError(f"mesh: {name} is given twice in {text!r}")
            sizes[name] = int(value)
        if not sizes:  # "" would be the default layout, which the caller did not ask for
            raise ValueError(f"mesh: expected data=D,stage=S,tensor=T, got {text!r}")
        if min(sizes.values()) < 1:
            raise ValueError(f"mesh: every axis must be at least 1, got {text!r}")
        return sizes

    @classmethod
    def axes(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls, value) -> "MeshShape":
        """A MeshShape from itself, its text (`tensor=8`) or a table of its axes (a config file's `{tensor = 8}`)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if not isinstance(value, dict):
            raise ValueError(f"mesh must be text like 'data=1,stage=1,tensor=8' or a table of data, stage and "
                             f"tensor, got {value!r}")
        unknown = sorted(map(str, set(value) - set(cls.axes())))
        if unknown:
            raise ValueError(f"mesh: unknown axis(es) {', '.join(unknown)} (the axes are {', '.join(cls.axes())})")
        for name, size in value.items():
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
                raise ValueError(f"mesh.{name} must be an integer of at least 1, got {size!r}")
        return cls(**{name: int(size) for name, size in value.items()})

    @property
    def size(self) -> int:
        return self.data * self.stage * self.tensor

    def __str__(self) -> str:
        return f"data={self.data},stage={self.stage},tensor={self.tensor}"


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model: slots, lengths, sampling defaults, kernels, layout. (How a server moves
    requests through it is serving.config's SchedulerConfig; what it listens with, its ServerConfig.)"""

    max_slots: int = 8  # sequences decoded together by the server (continuous batching)
    max_seq_len: int = 0  # KV cache length per slot; 0 means the model's n_positions
    max_new_tokens: int = 64  # default when a request does not say (capped by the limit and the prompt's room)
    max_new_tokens_limit: int = 0  # largest accepted; 0 means max_seq_len
    min_prefill_bucket: int = 16  # prompt lengths are padded to powers of two from here
    max_prefill_tokens: int = 8192  # a server prefill holds at most this many (padded) prompt tokens
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    eos_token_id: int = 50256
    attention: str = ""  # "" picks pallas on GPU, xla elsewhere
    decode_matmuls: str = ""  # "": the small-batch kernels for steps of <= 8 rows on one GPU (gptjax/decode_block.py)
    mesh: MeshShape = field(default_factory=MeshShape)

    def __post_init__(self):
        object.__setattr__(self, "mesh", MeshShape.of(self.mesh))
        if self.attention and self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if self.decode_matmuls and self.decode_matmuls not in MATMUL_IMPLS:
            raise ValueError(f"decode_matmuls must be one of {MATMUL_IMPLS}, got {self.decode_matmuls!r}")
        check_positive(self, ("max_slots", "max_new_tokens", "min_prefill_bucket", "max_prefill_tokens"))
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"EngineConfig.top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, numbers.Real) \
                or not math.isfinite(self.temperature) or self.temperature < 0:  # else each request fails on it
            raise ValueError(f"EngineConfig.temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) or self.top_k < 0:
            raise ValueError(f"EngineConfig.top_k must be a whole number >= 0, got {self.top_k!r}")
        if self.max_seq_len < 0 or self.max_new_tokens_limit < 0:
            raise ValueError("EngineConfig.max_seq_len and max_new_tokens_limit must not be negative (0: the model's)")
        if self.max_seq_len == 1:  # a server started, then refused every prompt: none fits beside a new token
            raise ValueError("EngineConfig.max_seq_len must be 0 (the model's n_positions) or at least 2 (a prompt "
                             "token and a new one), got 1")

    def ending_at(self, tokenizer) -> "EngineConfig":
        """This config, stopping at `tokenizer`'s <|endoftext|> if it kept GPT-2's default id: a checkpoint with a
        vocabulary of its own then ends where its text does."""
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None or self.eos_token_id != EngineConfig.eos_token_id:
            return self
        return dataclasses.replace(self, eos_token_id=eos)

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    def seq_len(self, model: ModelConfig) -> int:
        return min(self.max_seq_len or model.n_positions, model.n_positions)

    def new_tokens_limit(self, model: ModelConfig) -> int:
        return min(self.max_new_tokens_limit or self.seq_len(model), self.seq_len(model))


def engine_config_of(value) -> EngineConfig:
    """An EngineConfig from itself, a dict of its fields, or None (the defaults)."""
    if value is None or isinstance(value, EngineConfig):
        return value or EngineConfig()
    if isinstance(value, dict):
        return config_from_dict(EngineConfig, value, "engine_config")
    raise ValueError(f"engine_config must be an EngineConfig or a dict of its fields, got {type(value).__name__}")


def check_positive(config, names) -> None:
    """Raise ValueError naming the first of a config's `names` fields that is not positive."""
    for name in names:
        if not getattr(config, name) > 0:  # not int(): that made 0.5 s "not positive", and NaN a ValueError of its own
            raise ValueError(f"{type(config).__name__}.{name} must be positive, got {getattr(config, name)}")


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# the annotation of a field (a string: annotations are not evaluated) -> what a value of it must be
_FIELD_KINDS = {"int": (numbers.Integral, "an integer"), "float": (numbers.Real, "a finite number"),
                "str": (str, "a string"), "bool | None": (bool, "true or false")}


def config_from_dict(cls, data: dict, source: str = "config"):
    """A `cls` config from a file's table: unknown fields and values of the wrong type are refused, named."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a table of {cls.__name__} fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s): {', '.join(unknown)}")
    for name, value in data.items():
        kind, what = _FIELD_KINDS.get(fields[name].type, (None, ""))
        if kind is None:
            continue
        wrong_bool = isinstance(value, bool) and kind is not bool
        if wrong_bool or not isinstance(value, kind) or (kind is numbers.Real and not _finite(value)):
            raise ValueError(f"{cls.__name__}.{name} must be {what}, got {value!r}")
    return cls(**data)




def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past float's range (a JSON file's 1 followed by 400 zeros)
        return False


def _read_json(text: str):
    return json.loads(text, object_pairs_hook=_no_repeated_keys)


FORMATS = {".json": _read_json, ".toml": tomllib.loads}  # config file suffix -> reader (tomllib refuses repeated keys)


def load_file(path: str | Path) -> dict:
    """Read a JSON or TOML file into a dict. The suffix says which (.json, .toml); a file of any other suffix is
    read as JSON, else as TOML. ValueError naming the format(s) tried and why, when the text does not parse."""
    path = Path(path)
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix in FORMATS:  # a .json file that is not JSON is an error, though it may read as TOML: say so
        try:
            return _parse(suffix, text)
        except RepeatedKey:
            raise
        except ValueError as e:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
            other = next(s for s in FORMATS if s != suffix)
            hint = f"; it reads as {_name(other)}: give it the suffix {other}" if _reads(other, text) else ""
            raise ValueError(f"not valid {_name(suffix)} (its suffix {path.suffix} says {_name(suffix)}): {e}{hint}"
                             ) from None
    errors = []
    for s in FORMATS:
        try:
            return _parse(s, text)
        except RepeatedKey:  # JSON, then, with a key given twice: that is what is wrong
            raise
        except ValueError as e:
            errors.append(f"as {_name(s)}: {e}")
    which = f"the suffix {path.suffix}" if path.suffix else "no suffix"
    raise ValueError(f"neither JSON nor TOML ({'; '.join(errors)}): the suffix chooses the format (.json or .toml), "
                     f"and a file with {which} is tried as JSON, then as TOML")


def _parse(suffix: str, text: str):
    try:
        return FORMATS[suffix](text)
    except RecursionError:  # both readers recurse per level: a file of 100000 "[" was a traceback
        raise ValueError("nested too deeply") from None


def _name(suffix: str) -> str:
    return suffix[1:].upper()


def _reads(suffix: str, text: str) -> bool:
    try:
        return isinstance(_parse(suffix, text), dict)
    except ValueError:
        return False


class RepeatedKey(ValueError):
    """A JSON object that gives a key twice."""


def _no_repeated_keys(pairs: list) -> dict:
    """A JSON object, refused when it gives a key twice (json keeps the last one silently; TOML refuses it)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise RepeatedKey(f"the key {key!r} is given twice in one object")
        out[key] = value
    return out
