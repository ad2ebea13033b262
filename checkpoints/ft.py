"""FasterTransformer GPT "c-model" folders (`config.ini` + raw `model.*.bin` files) -> a checkpoint folder.

What FasterTransformer's Megatron converter (`megatron_ckpt_convert.py`, FT v4/v5) writes, per folder
`<N>-gpu/`: raw little-endian fp32 or fp16 arrays with no header, weights transposed to [in, out], split over
N tensor-parallel ranks (suffix `.R.bin`):
- `model.wte.bin` [vocab, hidden], `model.wpe.bin` [positions, hidden], `model.final_layernorm.{weight,bias}.bin`
- per layer `model.layers.L.`: `input_layernorm.*`, `post_attention_layernorm.*`, `attention.dense.bias`,
  `mlp.dense_4h_to_h.bias` (whole); `attention.query_key_value.weight.R` [hidden, 3, hidden/N] and `.bias.R`
  [3, hidden/N]; `attention.dense.weight.R` [hidden/N, hidden]; `mlp.dense_h_to_4h.weight.R` [hidden, inter/N]
  and `.bias.R`; `mlp.dense_4h_to_h.weight.R` [inter/N, hidden].
"""

from __future__ import annotations

import configparser
import math
import re
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptjax.checkpoint import CheckpointError, first_nonfinite, save_checkpoint
from gptjax.config import ModelConfig

_DTYPES = {"fp32": (np.float32, "float32"), "fp16": (np.float16, "float16")}
GPT2_VOCAB, GPT2_END_ID = 50257, 50256


def find_folder(src: str | Path) -> Path:
    """The folder holding config.ini: SRC itself, or its single `<N>-gpu` subfolder."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder")
    if (src / "config.ini").is_file():
        folder = src
    else:
        found = sorted(d for d in src.iterdir() if re.fullmatch(r"(unfusedQKV-)?\d+-gpu", d.name)
                       and (d / "config.ini").is_file())
        if len(found) != 1:
            what = "no config.ini" if not found else f"several c-model folders ({', '.join(d.name for d in found)})"
            raise CheckpointError(f"{src}: {what}; give the <N>-gpu folder that holds config.ini")
        folder = found[0]
    if folder.name.startswith("unfusedQKV"):
        raise CheckpointError(f"{folder}: unfused-QKV c-models are not supported (convert with -fused_qkv 1)")
    return folder


def read_config(folder: Path) -> tuple[ModelConfig, int, type, int]:
    """(config, tensor-parallel size, numpy dtype of the files, rows of model.wte.bin) from config.ini's [gpt]."""
    path = folder / "config.ini"
    parser = _parse_ini(path)
    if not parser.has_section("gpt"):
        raise CheckpointError(f"{path}: the [gpt] section is missing")
    gpt = parser["gpt"]
    field = partial(_field, gpt, path)
    _check_options(parser, folder, path)
    weight_type = gpt.get("weight_data_type", "fp32")
    if weight_type not in _DTYPES:
        raise CheckpointError(f"{path}: weight_data_type = {_shown(weight_type)} is not one of {', '.join(_DTYPES)}")
    np_dtype, dtype = _DTYPES[weight_type]
    heads = field("head_num", "n_head", least=1)
    size_per_head = field("size_per_head", least=1)
    hidden = heads * size_per_head
    n_layers = field("num_layer", "n_layer", least=1)
    if not (folder / f"model.layers.{n_layers - 1}.input_layernorm.weight.bin").is_file():
        raise CheckpointError(f"{path}: num_layer = {n_layers}, but the folder holds no layer {n_layers - 1}")
    itemsize = np.dtype(np_dtype).itemsize
    wpe = folder / "model.wpe.bin"
    positions = field("max_pos_seq_len", "n_positions", least=1,
                      default=(wpe.stat().st_size // (hidden * itemsize)) if wpe.is_file() else None)
    vocab = file_vocab = field("vocab_size", least=1)
    tp = field("tensor_para_size", "infer_gpu_num", default=_count_ranks(folder), least=1)
    if heads % tp:
        raise CheckpointError(f"{path}: head_num {heads} is not divisible by tensor_para_size {tp}")
    _check_files(folder, path, n_layers, tp)
    # Megatron pads GPT-2's vocabulary to a multiple of 128 x ranks; FT keeps the padding, we drop it
    if field("end_id", default=-1) == GPT2_END_ID and GPT2_VOCAB < vocab < GPT2_VOCAB + 1024 and vocab % 128 == 0:
        vocab = GPT2_VOCAB
    ffn_hidden = field("inter_size", default=4 * hidden, least=1)  # ModelConfig would take 0 for 4 x hidden
    eps = field("layernorm_eps", "layer_norm_eps", default=1e-5, kind=float)
    try:
        config = ModelConfig(n_layers=n_layers, hidden=hidden, n_heads=heads, vocab_size=vocab, n_positions=positions,
                             ffn_hidden=ffn_hidden, layer_norm_eps=eps, activation="gelu_new", dtype=dtype)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if config.ffn_hidden % tp:
        raise CheckpointError(f"{path}: inter_size {config.ffn_hidden} is not divisible by tensor_para_size {tp}")
    return config, tp, np_dtype, file_vocab


INI_LIMIT = 1 << 20  # FasterTransformer's config.ini is under 1 KiB; a file this large is something else


def _parse_ini(path: Path) -> configparser.ConfigParser:
    """config.ini read as FasterTransformer's INI reader takes it: without `%(name)s` interpolation, whose
    nested references (configparser's default) grow a few lines past any memory and time."""
    with open(path, "rb") as f:
        data = f.read(INI_LIMIT + 1)  # not read_text(): a huge file (or a link to one) would fill memory
    if len(data) > INI_LIMIT:
        raise CheckpointError(f"{path}: larger than {INI_LIMIT} bytes: not a FasterTransformer config.ini")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(data.decode())
    except (configparser.Error, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid config.ini ({str(e).splitlines()[0]})") from None
    return parser


def _shown(text: str) -> str:
    """A value from the file as a message shows it: quoted, and cut short (a value may be a megabyte)."""
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _field(gpt, path: Path, *names, default=None, kind=int, least=None):
    """The first of `names` in [gpt]; an int in plain decimal digits (Python's int() takes `1_0` and other
    scripts' digits, which FasterTransformer's strtol reads otherwise)."""
    for n in names:
        if n in gpt:
            text = gpt[n].strip()
            try:
                if kind is int and not re.fullmatch(r"[+-]?[0-9]+", text):
                    raise ValueError(text)
                value = kind(text)
            except ValueError:  # also int() of over 4300 digits
                raise CheckpointError(f"{path}: {n} = {_shown(gpt[n])} is not a valid {kind.__name__}") from None
            if least is not None and value < least:
                raise CheckpointError(f"{path}: {n} = {value} must be at least {least}")
            return value
    if default is None:
        raise CheckpointError(f"{path}: field {names[0]} is missing")
    return default


def _check_options(parser: configparser.ConfigParser, folder: Path, path: Path) -> None:
    """Refuse what makes FasterTransformer run another model than this GPT, naming the option."""
    for section, key, plain in _VARIANTS:
        text = parser.get(section, key, fallback=None) if parser.has_section(section) else None
        if text is not None and _flag(text, path, key) != plain:
            raise CheckpointError(f"{path}: {key} = {text} is not supported (this GPT needs {plain})")
    if (folder / "model.lm_head.weight.bin").is_file():
        raise CheckpointError(f"{folder}: model.lm_head.weight.bin is an output layer of its own; gptjax runs GPT "
                              "with the output layer tied to the token embedding")
    gpt = parser["gpt"]
    if gpt.get("layernorm_type", "pre_layernorm") != "pre_layernorm":
        raise CheckpointError(f"{path}: layernorm_type = {_shown(gpt['layernorm_type'])} is not supported")
    if gpt.get("activation_type", "gelu").lower() not in ("gelu", "gelu_new"):
        raise CheckpointError(f"{path}: activation_type = {_shown(gpt['activation_type'])} is not supported")


# (section, key, the value this GPT needs) of the c-model options that make FasterTransformer run another model
_VARIANTS = (("gpt", "has_adapters", False), ("gpt", "has_pre_decoder_layernorm", False),
             ("gpt", "has_post_decoder_layernorm", True), ("gpt", "has_positional_encoding", True),
             ("gpt", "use_attention_linear_bias", False), ("structure", "gpt_with_moe", False))


def _flag(text: str, path: Path, key: str) -> bool:
    """An INI boolean as FasterTransformer's reader takes it."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise CheckpointError(f"{path}: {key} = {_shown(text)} is not true or false")


def _count_ranks(folder: Path) -> int:
    ranks = {int(m.group(1)) for f in folder.glob("model.layers.0.attention.query_key_value.weight.*.bin")
             if (m := re.search(r"\.(\d+)\.bin$", f.name))}
    return len(ranks) or 1


_LAYER_FILE = re.compile(r"model\.layers\.([0-9]+)\.(.+?)(?:\.([0-9]+))?\.bin")
_SPLIT = {"attention.query_key_value.weight", "attention.query_key_value.bias", "attention.dense.weight",
          "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight"}  # one file per rank


def _check_files(folder: Path, path: Path, n_layers: int, tp: int) -> None:
    """No layer file past num_layer, no rank file past tensor_para_size: such files mean config.ini is not this
    folder's (or two conversions share it), and reading only what it names would drop them without a word."""
    layers, ranks = {}, {}  # index -> a file that holds it
    for f in folder.iterdir():
        m = _LAYER_FILE.fullmatch(f.name)
        if m:
            layer = int(m.group(1))
            layers[layer] = min(layers.get(layer, f.name), f.name)
            if m.group(2) in _SPLIT and m.group(3) is not None:
                rank = int(m.group(3))
                ranks[rank] = min(ranks.get(rank, f.name), f.name)
    if layers and max(layers) >= n_layers:
        raise CheckpointError(f"{path}: num_layer = {n_layers}, but the folder holds layer {max(layers)} "
                              f"({layers[max(layers)]})")
    if ranks and max(ranks) >= tp:
        raise CheckpointError(f"{path}: tensor_para_size = {tp}, but the folder holds rank {max(ranks)} "
                              f"({ranks[max(ranks)]})")


class Reader:
    """Raw arrays from the folder, each checked for its exact byte size."""

    def __init__(self, folder: Path, dtype):
        self.folder, self.dtype = folder, np.dtype(dtype)

    def __call__(self, name: str, shape: tuple[int, ...], rows: int | None = None) -> np.ndarray:
        """`model.<name>.bin` as `shape`; with `rows`, only its first `rows` rows (the file may hold more)."""
        path = self.folder / f"model.{name}.bin"
        if not path.is_file():
            raise CheckpointError(f"{self.folder}: {path.name} is missing")
        count = math.prod(shape)  # exact: numpy's prod wraps past 2**63, and a config.ini can make it fit the file
        want = count * self.dtype.itemsize
        size = path.stat().st_size
        if size != want:
            fits = [k for k, (t, _) in _DTYPES.items() if np.dtype(t) != self.dtype
                    and size == count * np.dtype(t).itemsize]
            raise CheckpointError(f"{path.name}: {size} bytes, expected {want} (shape {shape} of {self.dtype.name}); "
                                  "truncated, or config.ini does not match the files"
                                  + (f" (weight_data_type = {fits[0]} would fit its size)" if fits else ""))
        if rows is not None:
            shape = (rows, *shape[1:])
        data = np.fromfile(path, dtype=self.dtype, count=math.prod(shape)).reshape(shape)
        bad = first_nonfinite(data)
        if bad:
            raise CheckpointError(f"{path.name}: holds {bad}: the weights must be finite")
        return data


def read_ft(src: str | Path):
    """(config, params) of a FasterTransformer c-model folder."""
    folder = find_folder(src)
    config, tp, np_dtype, file_vocab = read_config(folder)
    read = Reader(folder, np_dtype)
    c, h, d, f = config.hidden, config.n_heads, config.head_dim, config.ffn_hidden
    hl, fl = h // tp, f // tp

    def norm(name):
        return {"scale": read(f"{name}.weight", (c,)), "bias": read(f"{name}.bias", (c,))}

    params = {"wte": read("wte", (file_vocab, c), rows=config.vocab_size),
              "wpe": read("wpe", (config.n_positions, c)), "ln_f": norm("final_layernorm")}
    for i in tqdm(range(config.n_layers), desc="layers", unit="layer", leave=False, disable=None):
        q = f"layers.{i}."

        def ranks(name, shape):
            return [read(f"{q}{name}.{r}", shape) for r in range(tp)]

        params[f"h_{i}"] = {
            "ln_1": norm(q + "input_layernorm"),
            "qkv": {"kernel": np.concatenate([w.reshape(c, 3, hl, d) for w in
                                              ranks("attention.query_key_value.weight", (c, 3, hl * d))], axis=2),
                    "bias": np.concatenate([b.reshape(3, hl, d) for b in
                                            ranks("attention.query_key_value.bias", (3, hl * d))], axis=1)},
            "attn_out": {"kernel": np.concatenate(ranks("attention.dense.weight", (hl * d, c))).reshape(h, d, c),
                         "bias": read(q + "attention.dense.bias", (c,))},
            "ln_2": norm(q + "post_attention_layernorm"),
            "mlp_in": {"kernel": np.concatenate(ranks("mlp.dense_h_to_4h.weight", (c, fl)), axis=1),
                       "bias": np.concatenate(ranks("mlp.dense_h_to_4h.bias", (fl,)))},
            "mlp_out": {"kernel": np.concatenate(ranks("mlp.dense_4h_to_h.weight", (fl, c))),
                        "bias": read(q + "mlp.dense_4h_to_h.bias", (c,))},
        }
    return config, params


def convert_ft(src: str | Path, dst: str | Path) -> Path:
    if Path(dst).exists():  # now, not after reading every weight
        raise CheckpointError(f"output folder {dst} already exists")
    config, params = read_ft(src)
    return save_checkpoint(dst, config, params)
