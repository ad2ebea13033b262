"""Hugging Face GPT-2 (`config.json` + `model.safetensors` or `pytorch_model.bin`) -> a checkpoint folder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from checkpoints.torch_pickle import safe_load, torch_to_numpy
from gptjax.checkpoint import CheckpointError, UnsupportedCheckpoint, first_nonfinite, save_checkpoint
from gptjax.config import ModelConfig
from gptjax.tokenizer import FOLDER_FILES, Tokenizer

_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
ARCHITECTURE = "GPT2LMHeadModel"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# GPT-2 options that change the model's math from the one this engine runs, with the value it needs
_FIXED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
          "tie_word_embeddings": True}


def check_architecture(hf: dict, label: str) -> None:
    """Refuse a config.json that is not a GPT-2 language model, naming its architecture."""
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list):
        raise CheckpointError(f"{label}: architectures should be a list, got {architectures!r}")
    if ARCHITECTURE not in architectures and (architectures or hf.get("model_type") != "gpt2"):
        found = ", ".join(map(str, architectures)) or f"model_type {hf.get('model_type')!r}"
        raise UnsupportedCheckpoint(f"{label}: {found} is not supported: gptjax runs GPT-2 models ({ARCHITECTURE})")
    for name, value in _FIXED.items():
        if name in hf and hf[name] != value:
            raise UnsupportedCheckpoint(f"{label}: {name}={hf[name]!r} is not supported (this model needs {value!r})")


def read_config(src: Path, label: str | None = None) -> ModelConfig:
    """The ModelConfig of a Hugging Face GPT-2 folder's config.json; messages start with `label` (the path)."""
    path = Path(src) / "config.json"
    label = label or str(path)
    if not path.is_file():
        raise CheckpointError(f"{src}: config.json is missing")
    try:
        hf = json.loads(path.read_text())
        if not isinstance(hf, dict):
            raise CheckpointError(f"{label}: expected a JSON object")
        check_architecture(hf, label)
        name = hf.get("activation_function", "gelu_new")
        activation = _ACTIVATIONS.get(name) if isinstance(name, str) else None
        if activation is None:
            raise CheckpointError(f"{label}: activation_function {name!r} is not supported")
        dtype = _DTYPES.get(str(hf.get("torch_dtype") or hf.get("dtype") or "float32"), "float32")
        eps = hf.get("layer_norm_epsilon", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise CheckpointError(f"{label}: layer_norm_epsilon must be a number, got {eps!r}")
        if isinstance(eps, int) and not -1e300 < eps < 1e300:  # float() of a JSON integer of 400 digits overflows
            raise CheckpointError(f"{label}: layer_norm_epsilon is too large a number")
        return ModelConfig(n_layers=_size(hf, "n_layer", label), hidden=_size(hf, "n_embd", label),
                           n_heads=_size(hf, "n_head", label), vocab_size=_size(hf, "vocab_size", label),
                           n_positions=_size(hf, "n_positions", label),
                           ffn_hidden=_size(hf, "n_inner", label) if hf.get("n_inner") is not None else 0,
                           activation=activation, dtype=dtype, layer_norm_eps=float(eps))
    except KeyError as e:
        raise CheckpointError(f"{label}: field {e.args[0]} is missing") from None
    except CheckpointError:
        raise
    except (TypeError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{label}: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{label}: not a config: nested too deeply") from None


def _size(hf: dict, name: str, label: str) -> int:
    """A size field of config.json, which must be a JSON integer: int() would take 64.9 as 64, or "2" and true."""
    value = hf[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{label}: {name} must be an integer, got {value!r}")
    return value


def read_tensors(src: Path) -> dict[str, np.ndarray]:
    """All tensors of the checkpoint as numpy arrays (one file or safetensors shards); never unpickles
    anything but tensors."""
    present = [name for name in WEIGHT_FILES if (src / name).is_file()]
    if not present:
        raise CheckpointError(f"{src}: none of {', '.join(WEIGHT_FILES)} is present")
    if present[0] == "pytorch_model.bin":
        state = safe_load(src / "pytorch_model.bin")
        if not isinstance(state, dict):
            raise CheckpointError(f"{src / 'pytorch_model.bin'}: expected a dict of tensors, "
                                  f"found {type(state).__name__}")
        odd = next((k for k in state if not isinstance(k, str)), None)
        if odd is not None:
            raise CheckpointError(f"{src / 'pytorch_model.bin'}: key {odd!r} is not a tensor name")
        return {k: torch_to_numpy(v, k) if hasattr(v, "numpy") else v for k, v in state.items()}
    files = [src / present[0]] if present[0] == "model.safetensors" else shard_files(src)
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(_read_safetensors(f))
    return tensors


def shard_names(index: Path) -> list[str]:
    """The shard files that a model.safetensors.index.json names (in its own folder)."""
    try:
        names = sorted({str(n) for n in json.loads(index.read_text())["weight_map"].values()})
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    if not names or any(Path(n).name != n or not n.endswith(".safetensors") for n in names):
        raise CheckpointError(f"{index}: weight_map should name .safetensors files in the same folder")
    return names


def shard_files(src: Path) -> list[Path]:
    """The files that model.safetensors.index.json names, each checked to be there."""
    index = src / "model.safetensors.index.json"
    names = shard_names(index)
    for n in names:
        if not (src / n).is_file():
            raise CheckpointError(f"{index} names {n}, which is missing")
    return [src / n for n in names]


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        try:
            return load_file(str(path))
        except (TypeError, AttributeError):  # numpy lacks bf16 (TypeError) and float8 (AttributeError): torch
            from safetensors.torch import load_file as load_torch

            return {k: torch_to_numpy(v, k) for k, v in load_torch(str(path)).items()}
    except CheckpointError:
        raise
    except Exception as e:  # truncated or corrupt: SafetensorError, OSError, ValueError, ...
        first = str(e).splitlines()[0] if str(e) else "no details"
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {first})") from None


def to_params(config: ModelConfig, tensors: dict[str, np.ndarray]):
    """The model's parameter tree from GPT-2's names (Conv1D weights are already [in, out])."""
    c, h, d = config.hidden, config.n_heads, config.head_dim
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""

    def get(name: str, stored: tuple[int, ...], shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor `name`, checked to have GPT-2's `stored` shape, as the model's `shape`."""
        key = prefix + name
        if key not in tensors:
            raise CheckpointError(f"tensor {key} is missing")
        value = tensors[key]
        if not isinstance(value, np.ndarray) or value.dtype.name not in _DTYPES:
            kind = value.dtype.name if isinstance(value, np.ndarray) else type(value).__name__
            raise CheckpointError(f"tensor {key} is {kind}, expected one of {', '.join(_DTYPES)}")
        if value.shape != stored:
            raise CheckpointError(f"tensor {key} has shape {tuple(value.shape)}, expected {stored}")
        bad = first_nonfinite(value)
        if bad:
            raise CheckpointError(f"tensor {key} holds {bad}: the weights must be finite numbers")
        return value.reshape(shape or stored)

    def norm(name):
        return {"scale": get(f"{name}.weight", (c,)), "bias": get(f"{name}.bias", (c,))}

    held = {int(m.group(1)) for k in tensors if (m := re.match(re.escape(prefix) + r"h\.(\d+)\.", k))}
    if len(held) != config.n_layers or max(held, default=-1) != len(held) - 1:  # first: before any n_layer loop
        raise CheckpointError(f"config.json gives n_layer {config.n_layers}, but the weights hold layers "
                              f"{_ranges(sorted(held))}" if held else "the weights hold no layers (h.0. ...)")
    f = config.ffn_hidden
    params = {"wte": get("wte.weight", (config.vocab_size, c)), "wpe": get("wpe.weight", (config.n_positions, c)),
              "ln_f": norm("ln_f")}
    head = tensors.get("lm_head.weight")
    if head is not None and not np.array_equal(head, params["wte"]):
        raise CheckpointError("tensor lm_head.weight differs from transformer.wte.weight: gptjax runs GPT-2 with "
                              "the output layer tied to the token embedding")
    for i in tqdm(range(config.n_layers), desc="layers", unit="layer", leave=False, disable=None):
        p = f"h.{i}."
        params[f"h_{i}"] = {
            "ln_1": norm(p + "ln_1"),
            "qkv": {"kernel": get(p + "attn.c_attn.weight", (c, 3 * c), (c, 3, h, d)),
                    "bias": get(p + "attn.c_attn.bias", (3 * c,), (3, h, d))},
            "attn_out": {"kernel": get(p + "attn.c_proj.weight", (c, c), (h, d, c)),
                         "bias": get(p + "attn.c_proj.bias", (c,))},
            "ln_2": norm(p + "ln_2"),
            "mlp_in": {"kernel": get(p + "mlp.c_fc.weight", (c, f)), "bias": get(p + "mlp.c_fc.bias", (f,))},
            "mlp_out": {"kernel": get(p + "mlp.c_proj.weight", (f, c)), "bias": get(p + "mlp.c_proj.bias", (c,))},
        }
    return params


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def convert_hf_gpt2(src: str | Path, dst: str | Path) -> Path:
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder")
    if dst.exists():  # now, not after reading every weight
        raise CheckpointError(f"output folder {dst} already exists")
    config = read_config(src)
    params = to_params(config, read_tensors(src))
    out = save_checkpoint(dst, config, params)
    try:  # the folder's own tokenizer comes along: without it the model would run on GPT-2's ids
        write_tokenizer_files(src, out)
    except CheckpointError:
        shutil.rmtree(out)
        raise
    return out


def write_tokenizer_files(src: Path, dst: Path) -> None:
    """The source folder's vocab.json and merges.txt into `dst`, or the two made from its tokenizer.json; neither
    when it has none (the engine then uses GPT-2's). They are read back once here: a pair that can't be read
    would fail every load of the checkpoint."""
    if all((src / n).is_file() for n in FOLDER_FILES):
        for n in FOLDER_FILES:
            shutil.copyfile(src / n, dst / n)
    elif (src / "tokenizer.json").is_file():
        vocab, merges = _byte_level_bpe(src / "tokenizer.json")
        (dst / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (dst / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                        encoding="utf-8")
    else:
        return
    try:
        Tokenizer(*(dst / n for n in FOLDER_FILES))
    except ValueError as e:  # the library's reason (Tokenizer's error names the files, in a folder not kept)
        e = e.__cause__ or e
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"its tokenizer can't be read ({first})") from None


def _byte_level_bpe(path: Path) -> tuple[dict, list]:
    """(vocab, merges) of a tokenizer.json holding GPT-2's kind of tokenizer; any other is refused, since
    the engine's tokenizer could not reproduce it."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model, pre = spec["model"], spec.get("pre_tokenizer") or {}
        kinds = [pre.get("type")] + [p.get("type") for p in pre.get("pretokenizers", [])]
        if model.get("type") != "BPE" or "ByteLevel" not in kinds:
            raise UnsupportedCheckpoint(f"its tokenizer ({model.get('type')} model, {pre.get('type')} "
                                        "pre-tokenizer) is not GPT-2's byte-level BPE, the one gptjax runs")
        merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
        vocab = dict(model["vocab"])
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as e:
        if isinstance(e, CheckpointError):
            raise
        first = str(e).splitlines()[0] if str(e) else "no details"
        raise CheckpointError(f"tokenizer.json can't be read ({type(e).__name__}: {first})") from None
    if not vocab or any(len(m) != 2 or not all(isinstance(t, str) and t and " " not in t for t in m) for m in merges):
        raise CheckpointError("tokenizer.json has an empty vocabulary, or merges that are not pairs of tokens "
                              "without spaces")
    return vocab, merges


def to_hf_model(config: ModelConfig, params, device: str = "cpu", torch_dtype=None):
    """A Hugging Face GPT2LMHeadModel holding the same weights: the peer for benchmarks and checks."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    torch_dtype = torch_dtype or dtypes[config.dtype]
    c, f = config.hidden, config.ffn_hidden
    hf_config = GPT2Config(n_layer=config.n_layers, n_embd=c, n_head=config.n_heads, n_positions=config.n_positions,
                           vocab_size=config.vocab_size, n_inner=f, layer_norm_epsilon=config.layer_norm_eps,
                           activation_function="gelu_new" if config.activation == "gelu_new" else "gelu",
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.device("meta"):
        model = GPT2LMHeadModel(hf_config)

    def tensor(x, shape=None):
        if _shareable(x, device, torch_dtype):
            t = torch.from_dlpack(x)  # the same memory: a 6.7B peer then costs no second copy of the weights
        else:
            t = torch.from_numpy(np.array(jax_to_numpy(x), np.float32)).to(device=device, dtype=torch_dtype)
        return t.reshape(shape) if shape else t

    state = {"transformer.wte.weight": tensor(params["wte"][: config.vocab_size]),
             "transformer.wpe.weight": tensor(params["wpe"]),
             "transformer.ln_f.weight": tensor(params["ln_f"]["scale"]),
             "transformer.ln_f.bias": tensor(params["ln_f"]["bias"])}
    for i in range(config.n_layers):
        p, h = f"transformer.h.{i}.", params[f"h_{i}"]
        state.update({
            p + "ln_1.weight": tensor(h["ln_1"]["scale"]), p + "ln_1.bias": tensor(h["ln_1"]["bias"]),
            p + "attn.c_attn.weight": tensor(h["qkv"]["kernel"], (c, 3 * c)),
            p + "attn.c_attn.bias": tensor(h["qkv"]["bias"], (3 * c,)),
            p + "attn.c_proj.weight": tensor(h["attn_out"]["kernel"], (c, c)),
            p + "attn.c_proj.bias": tensor(h["attn_out"]["bias"]),
            p + "ln_2.weight": tensor(h["ln_2"]["scale"]), p + "ln_2.bias": tensor(h["ln_2"]["bias"]),
            p + "mlp.c_fc.weight": tensor(h["mlp_in"]["kernel"]), p + "mlp.c_fc.bias": tensor(h["mlp_in"]["bias"]),
            p + "mlp.c_proj.weight": tensor(h["mlp_out"]["kernel"]),
            p + "mlp.c_proj.bias": tensor(h["mlp_out"]["bias"]),
        })
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (attention bias masks) are rebuilt on the device
            raise RuntimeError(f"buffer {name} was not materialized")
    return model.eval()


def _shareable(x, device: str, torch_dtype) -> bool:
    """Whether torch can use a JAX array's memory as it is: one whole array on one device of the kind asked
    for, already in the dtype asked for. The model only reads its weights, so sharing is safe."""
    import jax
    import torch

    if not isinstance(x, jax.Array) or len(x.devices()) != 1 or not x.is_fully_addressable:
        return False
    platform = {"cpu": "cpu", "cuda": "gpu"}.get(torch.device(device).type)
    return (next(iter(x.devices())).platform == platform
            and getattr(torch, str(x.dtype), None) == torch_dtype)


def jax_to_numpy(x) -> np.ndarray:
    """A host copy of a (possibly sharded) array; bf16 goes through float32."""
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype.kind == "V" or str(x.dtype) == "bfloat16" else x
