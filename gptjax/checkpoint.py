"""The checkpoint folder: `config.json` (the ModelConfig and a format version) and `params/` (orbax).

`params/` holds the full model's unsharded logical arrays under stable names (`wte`, `wpe`, `h_0/qkv/kernel`,
..., `ln_f/scale`); any mesh restores it straight into its own layout, each process reading only the pieces
its devices hold. Writers build the folder in a temporary sibling and rename it at the end, so a failed
conversion leaves nothing behind. A reader checks `config.json` against the saved shapes (orbax's metadata,
no array read) before it builds anything from the config, so a config that does not match its parameters is
refused at once, naming the field.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gptjax.config import ModelConfig, config_from_dict, to_dict
from gptjax.layout import layout_for
from gptjax.model import init_params, join_layers, layer_name, split_layers

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint or source file that can't be read; the message names the file or tensor."""


class UnsupportedCheckpoint(CheckpointError):
    """A whole, readable checkpoint of a kind gptjax does not run (another architecture or tokenizer)."""


def expected_shapes(config: ModelConfig):
    """The shape of every parameter of `config`, as a pytree of tuples."""
    return _shapes(jax.eval_shape(partial(init_params, config)))


def _shapes(tree) -> dict:
    """A nested dict of arrays (or anything with a shape: ShapeDtypeStructs, orbax's metadata) -> of shapes."""
    return {k: _shapes(v) if isinstance(v, dict) else tuple(getattr(v, "shape", np.shape(v))) for k, v in tree.items()}


def _flat(shapes: dict) -> dict[str, tuple]:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple))}


def check_params(config: ModelConfig, params) -> None:
    """Every expected parameter present, with the expected shape; messages name the parameter. `params`: arrays
    or anything with a shape (orbax's metadata)."""
    _compare(expected_shapes(config), _shapes(params))


def _compare(expected: dict, got: dict) -> None:
    expected, got = _flat(expected), _flat(got)
    for name, shape in expected.items():
        if name not in got:
            raise CheckpointError(f"parameter {name} is missing")
        if got[name] != shape:
            raise CheckpointError(f"parameter {name} has shape {got[name]}, expected {shape}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise CheckpointError(f"unexpected parameter {extra[0]}")


def first_nonfinite(values) -> str | None:
    """Where a tensor first holds NaN or infinity ("nan at [3, 1]"), or None. Such weights load and run, and every
    prompt then gets token 0, so the readers refuse them, naming the tensor."""
    finite = np.isfinite(values)
    if finite.all():
        return None
    index = tuple(int(i) for i in np.argwhere(~finite)[0])
    return f"{values[index]} at {list(index)}"


def to_host_arrays(params):
    """Numpy leaves -> jax arrays on the host CPU, in place, one leaf at a time.

    Orbax holds one extra copy of jax arrays while saving but two of numpy arrays; this keeps a conversion's
    peak memory near twice the model. Never the accelerator: the model need not fit there.
    """
    cpu = jax.devices("cpu")[0]
    for key, value in params.items():
        params[key] = to_host_arrays(value) if isinstance(value, dict) else (
            value if isinstance(value, jax.Array) else jax.device_put(value, cpu))
    return params


def save_checkpoint(dst: str | Path, config: ModelConfig, params) -> Path:
    """Write `params` (numpy or jax arrays, the model's tree) and `config` as a checkpoint folder at `dst`."""
    import orbax.checkpoint as ocp

    check_params(config, params)
    params = to_host_arrays(params)
    dst = Path(dst).absolute()
    if dst.exists():
        raise CheckpointError(f"output folder {dst} already exists")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        (tmp / "config.json").write_text(json.dumps({"format_version": FORMAT_VERSION,
                                                     "model": to_dict(config)}, indent=2) + "\n")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", params)
            ckptr.wait_until_finished()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_config(checkpoint_dir: str | Path) -> ModelConfig:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir} is not a checkpoint folder: {path.name} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a config: nested too deeply") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise CheckpointError(f"{path}: format_version {version!r} is not {FORMAT_VERSION}")
    try:
        return config_from_dict(ModelConfig, data["model"], str(path))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model config ({e})") from None


def saved_shapes(checkpoint_dir: str | Path) -> dict:
    """The shapes of the arrays in `params/`, from orbax's metadata alone (no array is read); each array checked to
    be saved as floating point: a restore casts whatever it finds to the config's dtype, integers too."""
    import orbax.checkpoint as ocp

    path = Path(checkpoint_dir).absolute() / "params"
    if not path.is_dir():
        raise CheckpointError(f"{path} is missing: not a folder that `gptjax convert` wrote")
    absl = logging.getLogger("absl")  # orbax warns of each missing metadata file; the error below says it once
    level = absl.level
    try:
        absl.setLevel(logging.ERROR)
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(path)
    except Exception as e:  # OSError, ValueError; KeyError or RecursionError from a _METADATA that is not orbax's
        first = str(e).splitlines()[0] if str(e) else "no details"
        raise CheckpointError(f"{path}: not an orbax checkpoint ({type(e).__name__}: {first})") from None
    finally:
        absl.setLevel(level)
    tree = getattr(meta, "item_metadata", meta)  # newer orbax wraps the tree in step metadata
    tree = getattr(tree, "tree", tree)
    if not tree:  # orbax finds no metadata: params/ or its _METADATA is gone
        raise CheckpointError(f"{path}: not an orbax checkpoint (no parameters listed: is its _METADATA there?)")
    for key, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: not isinstance(x, dict)):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
            raise CheckpointError(f"{path}: parameter {jax.tree_util.keystr(key)} is saved as {dtype}: the weights "
                                  "must be floating point")
    return _shapes(tree)


def _dim(shapes: dict, path: tuple[str, ...], rank: int, axis: int, source: str) -> int:
    node = shapes
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, tuple) or len(node) != rank:
        raise CheckpointError(f"{source}: parameter {'/'.join(path)} is missing or not of rank {rank}")
    return node[axis]


def check_sizes(config: ModelConfig, shapes: dict, source: str) -> None:
    """Every size `config` gives (layers, widths, vocabulary, positions) against what the saved parameters hold,
    so that nothing is built from a size no parameter backs; the message names the field."""
    layers, _ = split_layers(shapes)
    first = (layer_name(0),)
    held = {
        "n_layers": len(layers),
        "vocab_size": _dim(shapes, ("wte",), 2, 0, source),
        "hidden": _dim(shapes, ("wte",), 2, 1, source),
        "n_positions": _dim(shapes, ("wpe",), 2, 0, source),
        "n_heads": _dim(shapes, (*first, "qkv", "kernel"), 4, 2, source),
        "ffn_hidden": _dim(shapes, (*first, "mlp_in", "kernel"), 2, 1, source),
    }
    for name, have in held.items():
        if getattr(config, name) != have:
            raise CheckpointError(f"{source}: config.json gives {name} = {getattr(config, name)}, but the saved "
                                  f"parameters hold {have}")


def open_checkpoint(checkpoint_dir: str | Path, mesh, dtype: str | None = None):
    """(config, restore): config.json read and checked against the saved shapes now (cast to `dtype` if
    given), and `restore()` -> every parameter placed in `mesh`'s layout: the long part, which a caller may run
    beside other work (`Engine.load` compiles meanwhile).

    Each layer is read straight onto the devices of the stage that holds it (split there over `tensor` and
    `data` by the rules table), then the layers of a stage are stacked on those same devices: no device ever
    holds another stage's layers. The embedding is read whole, then padded and split over `tensor`.
    """
    config = read_config(checkpoint_dir)
    saved = saved_shapes(checkpoint_dir)
    check_sizes(config, saved, str(checkpoint_dir))  # first: the rest takes time and memory in these sizes
    if dtype:
        config = config.replace(dtype=dtype)
    layout = layout_for(config, mesh)
    abstract = jax.eval_shape(partial(init_params, config))
    try:
        _compare(_shapes(abstract), saved)
    except CheckpointError as e:
        raise CheckpointError(f"{checkpoint_dir}: config.json does not match the saved parameters: {e}") from None
    layers, rest = split_layers(abstract)

    def target(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.dtype(config.dtype), sharding=s),
                            tree, shardings)

    everywhere = NamedSharding(mesh, P())
    targets = join_layers([target(layer, layout.layer_restore_shardings(i)) for i, layer in enumerate(layers)],
                          {k: target(v, jax.tree.map(lambda _: everywhere, v)) for k, v in rest.items()})

    def restore():
        try:
            params = _read(Path(checkpoint_dir).absolute() / "params", targets)
        except Exception as e:  # orbax raises a bare Exception; its cause names the array and the file
            raise CheckpointError(f"{checkpoint_dir}: the saved parameters could not be read: "
                                  f"{e.__cause__ or e}") from e
        params = layout.assemble(*split_layers(params))
        _check_finite(params, everywhere, f"{checkpoint_dir}", config.dtype)
        return params

    return config, restore


def _check_finite(params, replicated, source: str, dtype: str) -> None:
    """Refuse weights holding NaN or infinity, naming the first such parameter: they load, and then every prompt
    gets token 0. Read as `dtype`, so a cast that overflows (bfloat16 weights past float16's range) shows too.
    One reduction a parameter, on the devices that hold it (every process runs it, as every process restores)."""
    finite = jax.jit(lambda p: jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), p), out_shardings=replicated)(params)
    for path, ok in jax.tree_util.tree_flatten_with_path(finite)[0]:
        if not bool(ok):
            raise CheckpointError(f"{source}: parameter {jax.tree_util.keystr(path)} holds NaN or infinity "
                                  f"(read as {dtype}); the weights must be finite")


def _read(path: Path, targets):
    """The saved arrays as `targets` asks. A layer held only by other processes' devices (its stage's, when the
    stage axis spans processes) is not read here: orbax can't make an array with no shard on this process, so it
    is made empty (each process reads what its own devices hold)."""
    import orbax.checkpoint as ocp

    def here(x) -> bool:
        return bool(x.sharding.addressable_devices)

    if all(here(x) for x in jax.tree.leaves(targets)):
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path, targets)
    local = jax.tree.map(lambda x: x if here(x) else None, targets)
    local = {k: v for k, v in local.items() if jax.tree.leaves(v)}
    with ocp.PyTreeCheckpointer() as ckptr:
        read = ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=local, restore_args=ocp.checkpoint_utils.construct_restore_args(local), partial_restore=True))
    return {k: read[k] if k in read else jax.tree.map(
        lambda x: jax.make_array_from_single_device_arrays(x.shape, x.sharding, [], dtype=x.dtype), v)
            for k, v in targets.items()}


def restore_in_background(restore) -> Future:
    """An `open_checkpoint` restore run on a thread of its own: its Future holds the parameters, or raises
    what the restore raised."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="restore")
    future = pool.submit(restore)
    pool.shutdown(wait=False)
    return future


def load_checkpoint(checkpoint_dir: str | Path, mesh, dtype: str | None = None):
    """(config, params) with every parameter placed in `mesh`'s layout (`open_checkpoint`, then its restore)."""
    config, restore = open_checkpoint(checkpoint_dir, mesh, dtype)
    return config, restore()
