"""Megatron-LM GPT checkpoints (`mp_rank_XX[_YYY]/model_optim_rng.pt` parts) -> a checkpoint folder.

A checkpoint is a folder, or a release archive as NVIDIA ships it (a zip holding
`release/mp_rank_00/model_optim_rng.pt`), which is unpacked into a temporary folder first: torch reads a part
file by seeking, which a compressed zip member can't do cheaply.

Megatron splits a model over tensor-parallel ranks the way our mesh does: QKV and h->4h by output columns,
the attention output and 4h->h by input rows, word embeddings by vocabulary rows (padded to a multiple of
128 x ranks); norms, biases of row-parallel layers and position embeddings are replicated. Pipeline stages
(`mp_rank_XX_YYY`) each number their layers from 0. Linear weights are [out, in].

The files are pickles: they are read with `torch.load(weights_only=True)`, which builds tensors and plain
containers only (and `argparse.Namespace`, for the training arguments, and a placeholder for each io.BytesIO,
TransformerEngine's `_extra_state`, whose bytes are never unpickled), so a file can't run code. They are
memory-mapped where the format allows, so optimizer state is never read. An archive is refused before unpacking
when it would not fit the disk, or unpacks past what weights compress to.
"""

from __future__ import annotations

import argparse
import numbers
import re
import shutil
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from functools import partial
from pathlib import Path, PurePosixPath

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from checkpoints.torch_pickle import safe_load, torch_to_numpy
from gptjax.checkpoint import CheckpointError, first_nonfinite, save_checkpoint
from gptjax.config import ModelConfig
from gptjax.planning import format_bytes

PART_FILES = ("model_optim_rng.pt", "model_rng.pt")
GPT2_VOCAB = 50257  # what Megatron's GPT2BPETokenizer holds before padding
_PART_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?")
_DTYPES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}
VERSIONS = (0, 1, 2, 3)  # Megatron-LM's checkpoint_version: each orders QKV's rows its own way (_qkv_to_heads)


# ---- finding and reading the files ----------------------------------------------------------------------
def find_parts(src: str | Path) -> list[list[Path]]:
    """The part files as [tensor rank][pipeline stage], from a tracker folder, a release/iter_N folder, a
    single mp_rank folder or a single file."""
    src = Path(src)
    if src.is_file():
        return [[src]]
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder")
    tracker = src / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        try:
            text = tracker.read_text().strip()
        except UnicodeDecodeError:
            raise CheckpointError(f"{tracker}: expected 'release' or an iteration number, got binary data") from None
        if text == "release":
            sub = "release"
        else:
            try:
                sub = f"iter_{int(text):07d}"
            except ValueError:
                raise CheckpointError(f"{tracker}: expected 'release' or an iteration number, got {text!r}") from None
        if not (src / sub).is_dir():
            raise CheckpointError(f"{tracker} names {sub}, but {src / sub} is not a folder")
        src = src / sub
    if _part_file(src):
        return [[_part_file(src)]]
    grid: dict[tuple[int, int], Path] = {}
    staged = set()  # whether the folder names carry a pipeline stage
    for d in src.iterdir():
        m = _PART_DIR.fullmatch(d.name)
        if m and d.is_dir():
            f = _part_file(d)
            if f is None:
                raise CheckpointError(f"{d}: neither {' nor '.join(PART_FILES)} is present")
            grid[int(m.group(1)), int(m.group(2) or 0)] = f
            staged.add(m.group(2) is not None)
    if not grid:
        raise CheckpointError(f"{src}: no mp_rank_XX folders (is this a Megatron-LM checkpoint?)")
    if len(staged) > 1:  # mp_rank_00 and mp_rank_00_000 would both be part (0, 0): one would be dropped unseen
        raise CheckpointError(f"{src} holds both mp_rank_XX and mp_rank_XX_YYY folders: parts of two checkpoints?")
    tp = 1 + max(r for r, _ in grid)
    pp = 1 + max(s for _, s in grid)
    for r in range(tp):
        for s in range(pp):
            if (r, s) not in grid:
                name = f"mp_rank_{r:02d}" if pp == 1 else f"mp_rank_{r:02d}_{s:03d}"
                raise CheckpointError(f"{src}: part {name} is missing ({tp} tensor x {pp} pipeline parts expected)")
    return [[grid[r, s] for s in range(pp)] for r in range(tp)]


def _part_file(folder: Path) -> Path | None:
    return next((folder / n for n in PART_FILES if (folder / n).is_file()), None)


def load_part(path: Path) -> dict:
    """One part file, unpickling nothing but tensors, plain containers and argparse.Namespace; the io.BytesIO of
    TransformerEngine's `_extra_state` entries (FP8 metadata, no weights) load as placeholders, never unpickled."""
    state = safe_load(path, allowed=(argparse.Namespace,), extra_state=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(state).__name__}")
    return state


# ---- one part's tensors under uniform names --------------------------------------------------------------
class Part:
    """One (tensor rank, pipeline stage) part: its tensors under normalized names, and its metadata."""

    def __init__(self, path: Path, state: dict, label: str):
        self.path, self.label = path, label
        self.version = _version(state.get("checkpoint_version"), label)
        self.args = state.get("args")
        model = state.get("model")
        if not isinstance(model, dict):
            if model is not None:
                raise CheckpointError(f"{label}: 'model' is {type(model).__name__}, expected a dict")
            found = ", ".join(sorted(k for k in state if isinstance(k, str) and k.startswith("model"))) or "none"
            raise CheckpointError(f"{label}: no 'model' entry (found model entries: {found}); "
                                  "virtual-pipeline and Megatron-core checkpoints are not supported")
        lm = model.get("language_model")
        if not isinstance(lm, dict):
            if any(isinstance(k, str) and k.startswith("decoder.") for k in model):
                raise CheckpointError(f"{label} holds a Megatron-core model (model.decoder.layers...), which is not "
                                      "supported: only the legacy Megatron-LM one (model.language_model...)")
            found = "missing" if lm is None else f"{type(lm).__name__}, expected a dict"
            raise CheckpointError(f"{label}: model.language_model is {found}")
        if "output_layer" in lm:
            raise CheckpointError(f"{label}: the checkpoint has an untied output layer "
                                  "(untie_embeddings_and_output_weights), which this model does not support")
        self.tensors: dict = {}
        emb = lm.get("embedding") or {}
        if not isinstance(emb, dict):
            raise CheckpointError(f"{label}: model.language_model.embedding is {type(emb).__name__}, expected a dict")
        for name in ("word_embeddings", "position_embeddings"):
            if isinstance(emb.get(name), dict) and "weight" in emb[name]:
                self.tensors[name] = emb[name]["weight"]
        head = model.get("word_embeddings_for_head")  # the last pipeline stage's copy of the embedding
        if isinstance(head, dict) and "weight" in head:
            self.tensors["word_embeddings_for_head"] = head["weight"]
        which = "encoder" if "encoder" in lm else "transformer"
        stack = lm.get(which)
        if stack is None:
            raise CheckpointError(f"{label}: model.language_model has neither 'encoder' nor 'transformer'")
        if not isinstance(stack, dict):
            raise CheckpointError(f"{label}: model.language_model.{which} is {type(stack).__name__}, expected a dict")
        for key, value in stack.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{label}: model.language_model.{which} has the key {key!r}, not a tensor name")
            self.tensors[key.replace(".self_attention.", ".attention.")] = value
        layers = {int(m.group(1)) for k in self.tensors if (m := re.match(r"layers\.(\d+)\.", k))}
        self.n_layers = 1 + max(layers) if layers else 0
        if len(layers) != self.n_layers:  # not set(range(n_layers)): a key layers.999999999999.x would fill memory
            missing = next(i for i in range(self.n_layers) if i not in layers)
            raise CheckpointError(f"{label}: layer {missing} is missing (the part holds layers up to "
                                  f"{self.n_layers - 1})")

    def get(self, key: str, shape: tuple[int, ...], shown: str | None = None):
        """The tensor `key` as numpy, checked to be `shape`."""
        if key not in self.tensors:
            raise CheckpointError(f"{self.label}: tensor {shown or key} is missing")
        t = self.tensors[key]
        if not hasattr(t, "shape") or str(t.dtype) not in _DTYPES:
            kind = t.dtype if hasattr(t, "dtype") else type(t).__name__
            raise CheckpointError(f"{self.label}: tensor {shown or key} is {kind}, expected one of "
                                  f"{', '.join(_DTYPES)}")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{self.label}: tensor {shown or key} has shape {tuple(t.shape)}, "
                                  f"expected {shape}")
        try:
            values = torch_to_numpy(t, shown or key)
        except CheckpointError as e:
            raise CheckpointError(f"{self.label}: {e}") from None
        bad = first_nonfinite(values)
        if bad:
            raise CheckpointError(f"{self.label}: tensor {shown or key} holds {bad}: the weights must be finite")
        return values


def _version(value, label: str) -> float:
    """checkpoint_version (absent: 0), one of VERSIONS: any other would put QKV's rows in an order unseen."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value not in VERSIONS:
        raise CheckpointError(f"{label}: checkpoint_version {value!r} is not one of Megatron-LM's "
                              f"{', '.join(map(str, VERSIONS))}")
    return float(value)


# ---- the config ----------------------------------------------------------------------------------------------
def _arg(args, *names, default=None):
    for n in names:
        v = getattr(args, n, None)
        if v is not None:
            return v
    return default


def _number(args, label: str, *names, default=None, kind=numbers.Integral):
    """A size (or, with kind=numbers.Real, a number) from the saved training arguments, refused naming the
    argument when it is not one: int() of a list or of "abc" says nothing of where it came from."""
    value = _arg(args, *names, default=default)
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if kind is numbers.Integral else "a number"
        raise CheckpointError(f"{label}: args.{names[0]} must be {what}, got {value!r}")
    try:
        return int(value) if kind is numbers.Integral else float(value)
    except OverflowError:  # float() of an integer past float's range
        raise CheckpointError(f"{label}: args.{names[0]} is too large a number") from None


def _check_supported(args, label: str) -> None:
    """Refuse architectures this GPT does not have, naming Megatron's argument."""
    if args is None:
        return
    unsupported = [
        ("position_embedding_type", lambda v: v not in (None, "learned_absolute"), "learned position embeddings"),
        ("normalization", lambda v: v not in (None, "LayerNorm"), "LayerNorm"),
        ("swiglu", bool, "a GELU MLP"),
        ("squared_relu", bool, "a GELU MLP"),
        ("apply_layernorm_1p", bool, "LayerNorm weights stored as they are used, not less one"),
        ("group_query_attention", bool, "multi-head attention"),
        ("add_bias_linear", lambda v: v is False, "biases on linear layers"),
        ("apply_residual_connection_post_layernorm", bool, "pre-LayerNorm residuals"),
        ("untie_embeddings_and_output_weights", bool, "an LM head tied to the embeddings"),
    ]
    for name, bad, needs in unsupported:
        v = getattr(args, name, None)
        if v is not None and bad(v):
            raise CheckpointError(f"{label}: args.{name}={v!r} is not supported (this model needs {needs})")


def _activation(args) -> str:
    """Megatron's GELU: its fused bias-GELU (the default) and --openai-gelu are the tanh approximation; without
    the fusion it runs the exact (erf) form, F.gelu or --onnx-safe's."""
    if args is None or _arg(args, "bias_gelu_fusion", "bias_activation_fusion", default=True):
        return "gelu_new"
    return "gelu_new" if _arg(args, "openai_gelu", default=False) else "gelu"


def build_config(parts: list[list[Part]], num_heads: int | None, vocab_size: int | None) -> tuple[ModelConfig, int]:
    """The ModelConfig (and Megatron's padded vocabulary) from the checkpoint's args, or from tensor shapes."""
    first = parts[0][0]
    tp, pp = len(parts), len(parts[0])
    args = first.args
    _check_supported(args, first.label)
    for name in ("position_embeddings", "word_embeddings"):  # sizes are read from their shapes below
        t = first.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{first.label}: tensor embedding.{name}.weight is missing")
        if not hasattr(t, "shape") or not hasattr(t, "dtype"):
            raise CheckpointError(f"{first.label}: tensor embedding.{name}.weight is {type(t).__name__}, "
                                  "expected a tensor")
        if len(t.shape) != 2:
            raise CheckpointError(f"{first.label}: tensor embedding.{name}.weight has shape {tuple(t.shape)}, "
                                  "expected 2 dimensions")
    wpe_shape = tuple(first.tensors["position_embeddings"].shape)
    for s in range(pp):  # merge() takes the layers from rank 0's count: another rank's extra layers would go unseen
        rank0, *others = [stages[s] for stages in parts]
        odd = next((p for p in others if p.n_layers != rank0.n_layers), None)
        if odd is not None:
            raise CheckpointError(f"{odd.label} holds {odd.n_layers} layers, but {rank0.label} holds "
                                  f"{rank0.n_layers}: the tensor-parallel parts of a stage must hold the same layers")
    found_layers = sum(p.n_layers for p in parts[0])
    if args is not None:
        if _arg(args, "num_attention_heads") is None:
            raise CheckpointError(f"{first.label}: args.num_attention_heads is missing")
        number = partial(_number, args, first.label)
        heads = number("num_attention_heads")
        if num_heads is not None and num_heads != heads:
            raise CheckpointError(f"--num-heads {num_heads} disagrees with the checkpoint's "
                                  f"num_attention_heads {heads}")
        hidden = number("hidden_size", default=wpe_shape[1])
        n_layers = number("num_layers", default=found_layers)
        ffn = number("ffn_hidden_size", default=4 * hidden)
        positions = number("max_position_embeddings", default=wpe_shape[0])
        padded = number("padded_vocab_size", default=first.tensors["word_embeddings"].shape[0] * tp)
        eps = number("layernorm_epsilon", "norm_epsilon", default=1e-5, kind=numbers.Real)
        args_tp = number("tensor_model_parallel_size", "model_parallel_size", default=tp)
        args_pp = number("pipeline_model_parallel_size", default=1)
        if (args_tp, args_pp) != (tp, pp):
            raise CheckpointError(f"the checkpoint was saved with tensor={args_tp} x pipeline={args_pp} parts, "
                                  f"but {tp} x {pp} were found")
        if vocab_size is None and _arg(args, "tokenizer_type") == "GPT2BPETokenizer" and padded >= GPT2_VOCAB:
            vocab_size = GPT2_VOCAB
    else:
        if num_heads is None:
            raise CheckpointError(f"{first.label} has no args: pass --num-heads")
        heads = num_heads
        hidden, positions = wpe_shape[1], wpe_shape[0]
        n_layers = found_layers
        h4h = first.tensors.get("layers.0.mlp.dense_h_to_4h.weight")
        if not hasattr(h4h, "shape") or len(h4h.shape) != 2:  # missing, or not a matrix to read the size from
            raise CheckpointError(f"{first.label}: tensor layers.0.mlp.dense_h_to_4h.weight is missing or not a "
                                  "matrix")
        ffn = int(h4h.shape[0]) * tp
        padded = int(first.tensors["word_embeddings"].shape[0]) * tp
        eps = 1e-5
    heads = int(heads)
    if heads <= 0 or hidden % heads:
        raise CheckpointError(f"hidden size {hidden} is not divisible by {heads} attention heads")
    if heads % tp:
        raise CheckpointError(f"{heads} attention heads can't be split over the checkpoint's {tp} tensor-parallel "
                              "parts: is the head count right?")
    if padded % tp:
        raise CheckpointError(f"padded vocabulary {padded} is not divisible by {tp} tensor-parallel parts")
    if found_layers != n_layers:
        raise CheckpointError(f"the checkpoint's args say {n_layers} layers, but the parts hold {found_layers}")
    if vocab_size is not None and not 0 < vocab_size <= padded:
        raise CheckpointError(f"--vocab-size {vocab_size} must be between 1 and the checkpoint's "
                              f"padded vocabulary {padded}")
    dtype = _DTYPES.get(str(first.tensors["word_embeddings"].dtype))
    if dtype is None:
        raise CheckpointError(f"{first.label}: word_embeddings dtype {first.tensors['word_embeddings'].dtype} "
                              "is not supported")
    try:
        config = ModelConfig(n_layers=n_layers, hidden=hidden, n_heads=heads, vocab_size=vocab_size or padded,
                             n_positions=positions, ffn_hidden=ffn, layer_norm_eps=eps,
                             activation=_activation(args), dtype=dtype)
    except ValueError as e:
        raise CheckpointError(f"bad model shape in the checkpoint: {e}") from None
    return config, padded


# ---- merging -------------------------------------------------------------------------------------------------
def _qkv_to_heads(x: np.ndarray, version: float, heads: int, d: int) -> np.ndarray:
    """One rank's fused QKV rows [3 * heads * d, ...] -> [3, heads, d, ...], whatever the version's order."""
    rest = x.shape[1:]
    if version == 0:  # all Q, all K, all V
        return x.reshape(3, heads, d, *rest)
    if version == 1:  # per head, per dim: q, k, v
        return np.moveaxis(x.reshape(heads, d, 3, *rest), 2, 0)
    return np.swapaxes(x.reshape(heads, 3, d, *rest), 0, 1)  # versions 2, 3: per head: q, k, v


def merge(config: ModelConfig, padded: int, parts: list[list[Part]]):
    """The model's parameter tree from the parts (numpy, one copy of each tensor)."""
    tp = len(parts)
    c, h, d, f = config.hidden, config.n_heads, config.head_dim, config.ffn_hidden
    hl, fl, vl = h // tp, f // tp, padded // tp
    dt = np.dtype(jnp.dtype(config.dtype))
    ranks0 = [stages[0] for stages in parts]
    last = [stages[-1] for stages in parts]

    def cast(x):
        return x if x.dtype == dt else x.astype(dt)

    wte = np.concatenate([p.get("word_embeddings", (vl, c), "embedding.word_embeddings.weight") for p in ranks0])
    for r, p in enumerate(last if len(parts[0]) > 1 else []):  # the last stage's copy of wte, for the LM head
        if "word_embeddings_for_head" not in p.tensors:
            continue
        head = p.get("word_embeddings_for_head", (vl, c), "word_embeddings_for_head.weight")
        if not np.array_equal(head, wte[r * vl:(r + 1) * vl]):
            raise CheckpointError(f"{p.label}: tensor word_embeddings_for_head.weight differs from the word "
                                  "embeddings: gptjax runs the output layer tied to the token embedding")
    params = {"wte": cast(wte[: config.vocab_size]),
              "wpe": cast(np.array(ranks0[0].get("position_embeddings", (config.n_positions, c),
                                                 "embedding.position_embeddings.weight"))),
              "ln_f": {"scale": cast(np.array(last[0].get("final_layernorm.weight", (c,)))),
                       "bias": cast(np.array(last[0].get("final_layernorm.bias", (c,))))}}
    del wte
    layer = 0
    with tqdm(total=config.n_layers, desc="layers", unit="layer", leave=False, disable=None) as bar:
        for s in range(len(parts[0])):
            stage = [stages[s] for stages in parts]
            for local in range(stage[0].n_layers):
                q = f"layers.{local}."
                p0 = stage[0]

                def rep(name):
                    return cast(np.array(p0.get(q + name, (c,))))

                qkv_w = [_qkv_to_heads(p.get(q + "attention.query_key_value.weight", (3 * hl * d, c)), p.version,
                                       hl, d) for p in stage]  # [3, hl, d, c] views
                qkv_b = [_qkv_to_heads(p.get(q + "attention.query_key_value.bias", (3 * hl * d,)), p.version, hl, d)
                         for p in stage]
                params[f"h_{layer}"] = {
                    "ln_1": {"scale": rep("input_layernorm.weight"), "bias": rep("input_layernorm.bias")},
                    "qkv": {"kernel": cast(np.concatenate([w.transpose(3, 0, 1, 2) for w in qkv_w], axis=2)),
                            "bias": cast(np.concatenate(qkv_b, axis=1))},
                    "attn_out": {"kernel": cast(np.concatenate(
                        [p.get(q + "attention.dense.weight", (c, hl * d)).T.reshape(hl, d, c) for p in stage])),
                        "bias": rep("attention.dense.bias")},
                    "ln_2": {"scale": rep("post_attention_layernorm.weight"),
                             "bias": rep("post_attention_layernorm.bias")},
                    "mlp_in": {"kernel": cast(np.concatenate(
                        [p.get(q + "mlp.dense_h_to_4h.weight", (fl, c)).T for p in stage], axis=1)),
                        "bias": cast(np.concatenate([p.get(q + "mlp.dense_h_to_4h.bias", (fl,)) for p in stage]))},
                    "mlp_out": {"kernel": cast(np.concatenate(
                        [p.get(q + "mlp.dense_4h_to_h.weight", (c, fl)).T for p in stage])),
                        "bias": rep("mlp.dense_4h_to_h.bias")},
                }
                layer += 1
                bar.update()
    return params


def read_megatron(src: str | Path, *, num_heads: int | None = None, vocab_size: int | None = None,
                  work_dir: str | Path | None = None):
    """(config, params) of a Megatron-LM checkpoint: a folder, a part file, or a release archive (unpacked
    for the while into a temporary folder in `work_dir`, by default the system's)."""
    with unpacked(Path(src), work_dir) as folder:
        files = find_parts(folder)
        tp, pp = len(files), len(files[0])
        parts = []
        with tqdm(total=tp * pp, desc="reading parts", unit="part", leave=False, disable=None) as bar:
            for r, stages in enumerate(files):
                row = []
                for s, path in enumerate(stages):
                    label = str(path) if tp * pp == 1 else f"{path.parent.name}/{path.name}"
                    row.append(Part(path, load_part(path), label))
                    bar.update()
                parts.append(row)
        versions = {p.version for row in parts for p in row}
        if len(versions) > 1:
            raise CheckpointError(f"the parts disagree on checkpoint_version: {sorted(versions)}")
        config, padded = build_config(parts, num_heads, vocab_size)
        return config, merge(config, padded, parts)


def convert_megatron(src: str | Path, dst: str | Path, *, num_heads: int | None = None,
                     vocab_size: int | None = None) -> Path:
    """Write the checkpoint folder `dst` from a Megatron-LM folder or release archive (unpacked beside `dst`,
    where the space for the output is)."""
    dst = Path(dst)
    if dst.exists():
        raise CheckpointError(f"output folder {dst} already exists")
    config, params = read_megatron(src, num_heads=num_heads, vocab_size=vocab_size, work_dir=dst.absolute().parent)
    return save_checkpoint(dst, config, params)


# ---- the release archive (the zip as downloaded) --------------------------------------------------------------
_ARCHIVE_PART = re.compile(r"(?:.+/)?mp_rank_\d{2}(?:_\d{3})?/(?:" + "|".join(re.escape(n) for n in PART_FILES) + ")")
TRACKER = "latest_checkpointed_iteration.txt"


def archive_members(src: Path) -> list[str]:
    """The part files and iteration trackers of a release archive; [] when `src` is not one (a part file in
    torch's own format is a zip too, but holds no mp_rank_XX folders)."""
    if not src.is_file() or not zipfile.is_zipfile(src):
        return []
    try:
        with zipfile.ZipFile(src) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{src}: cannot read the archive ({e})") from None
    parts = [n for n in names if _ARCHIVE_PART.fullmatch(n)]
    members = parts + [n for n in names if n.rsplit("/", 1)[-1] == TRACKER] if parts else []
    for n in members:  # the members are read from where they unpack; a name must not point elsewhere
        if PurePosixPath(n).is_absolute() or ".." in PurePosixPath(n).parts or "\\" in n or ":" in n:
            raise CheckpointError(f"{src}: member {n} is not a relative path inside the archive")
    return members


@contextmanager
def unpacked(src: Path, work_dir: str | Path | None):
    """`src` itself; or, for a release archive, the checkpoint folder it holds, unpacked into a temporary folder
    that is removed afterwards. Messages then name the archive's members, not the temporary files."""
    members = archive_members(src)
    if not members:
        yield src
        return
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    check_unpacked_size(src, members, Path(work_dir if work_dir is not None else tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix=".megatron-unpacked-", dir=work_dir) as tmp:
        try:
            _extract(src, members, Path(tmp))
            yield _archive_root(src, members, Path(tmp))
        except CheckpointError as e:
            raise CheckpointError(str(e).replace(f"{tmp}/", f"{src}:")) from None


# Deflate can't shrink data more than about 1032:1, and zip bombs come near that. Weights in any float format
# compress to about 1.1:1 (their low mantissa bits are noise), and a checkpoint with large all-zero tensors in it
# stays far under 100:1; an archive past that unpacks to something else than a checkpoint.
MAX_RATIO = 100
_RATIO_FLOOR = 1 << 20  # below a megabyte of output the ratio says nothing (a tracker file of padding)


def check_unpacked_size(src: Path, members: list[str], into: Path) -> None:
    """Refuse, before writing a byte, an archive whose members would fill the disk under `into`, or that unpack
    more than weights compress to. zipfile stops each member at the size its directory entry declares (the CRC
    check then fails), so the declared sizes bound what extraction can write."""
    try:
        with zipfile.ZipFile(src) as zf:
            infos = [zf.getinfo(name) for name in members]
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{src}: cannot read the archive ({e})") from None
    size = sum(info.file_size for info in infos)
    packed = sum(info.compress_size for info in infos)
    free = shutil.disk_usage(into).free
    if size > free:
        raise CheckpointError(f"{src}: would unpack {format_bytes(size)} into {into}, but only {format_bytes(free)} "
                              "are free there")
    if size > _RATIO_FLOOR and size > MAX_RATIO * packed:
        raise CheckpointError(f"{src}: would unpack {format_bytes(size)} from {format_bytes(packed)} "
                              f"({size // max(packed, 1)}:1, more than weights ever compress to, at most "
                              f"{MAX_RATIO}:1): a zip bomb or a damaged archive")


def _extract(src: Path, members: list[str], into: Path) -> None:
    with zipfile.ZipFile(src) as zf:
        for name in tqdm(members, desc="unpacking", unit="file", leave=False, disable=None):
            try:
                zf.extract(name, into)  # zipfile keeps every member inside `into`
            except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
                raise CheckpointError(f"{src}: cannot unpack {name}: truncated or corrupt archive "
                                      f"({type(e).__name__}: {e})") from None


def _archive_root(src: Path, members: list[str], tmp: Path) -> Path:
    """The folder to read: the one release/iter_N folder, or the top holding the tracker that picks one."""
    folders = {PurePosixPath(m).parent.parent for m in members if _ARCHIVE_PART.fullmatch(m)}
    if len(folders) == 1:
        return tmp / folders.pop()
    tops = {f.parent for f in folders}
    if len(tops) == 1 and (tmp / tops.copy().pop() / TRACKER).is_file():
        return tmp / tops.pop()
    raise CheckpointError(f"{src} holds several checkpoints ({', '.join(sorted(map(str, folders)))}): "
                          "unpack it and convert one of them")
