"""The checkpoint folder: `config.json` (the ModelConfig and a format version) and `params/` (orbax).

`params/` holds the full model's unsharded logical arrays under stable names (`wte`, `wpe`, `h_0/qkv/kernel`,
..., `ln_f/scale`); any mesh restores it straight into its own sharding, each process reading only the
pieces its devices hold. Writers build the folder in a temporary sibling and rename it at the end, so a
failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import sharding
from gptjax.config import ModelConfig, model_config_from_dict, to_dict
from gptjax.model import init_params

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint or source file that can't be read; the message names the file or tensor."""


def expected_shapes(config: ModelConfig):
    """The shape of every parameter of `config`, as a pytree of tuples."""
    return jax.tree.map(lambda x: tuple(x.shape), jax.eval_shape(lambda: init_params(config)))


def check_params(config: ModelConfig, params) -> None:
    """Every expected parameter present, with the expected shape; messages name the parameter."""
    expected = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(
        expected_shapes(config), is_leaf=lambda x: isinstance(x, tuple))}
    got = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    for name, shape in expected.items():
        if name not in got:
            raise CheckpointError(f"parameter {name} is missing")
        if got[name] != shape:
            raise CheckpointError(f"parameter {name} has shape {got[name]}, expected {shape}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise CheckpointError(f"unexpected parameter {extra[0]}")


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
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {data.get('format_version')!r} is not {FORMAT_VERSION}")
    try:
        return model_config_from_dict(data["model"], str(path))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model config ({e})") from None


def load_checkpoint(checkpoint_dir: str | Path, mesh, dtype: str | None = None):
    """(config, params) with every parameter placed in `mesh`'s layout (and cast to `dtype` if given).

    Each layer is read straight onto the devices of the stage that holds it (split there over `tensor` and
    `data` by the rules table), then the layers of a stage are stacked on those same devices: no device ever
    holds another stage's layers. The embedding is read whole, then padded and split over `tensor`.
    """
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from gptjax.pipeline import stack_placed_layers

    config = read_config(checkpoint_dir)
    if dtype:
        config = config.replace(dtype=dtype)
    shape = sharding.mesh_shape(mesh)
    sharding.check_layout(config, shape)
    shapes = jax.eval_shape(lambda: init_params(config))
    layer_shardings = sharding.param_shardings(config, sharding.make_mesh(
        shape.data, 1, shape.tensor, devices=mesh.devices[:, :1].reshape(-1)))["h_0"]
    per = config.n_layers // shape.stage

    def target(name, tree):
        if name.startswith("h_"):  # on the devices of the stage that holds this layer
            stage = int(name[2:]) // per
            stage_mesh = Mesh(mesh.devices[:, stage : stage + 1], mesh.axis_names)
            specs = jax.tree.map(lambda s: NamedSharding(stage_mesh, s.spec), layer_shardings)
        else:
            specs = jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.dtype(config.dtype), sharding=s),
                            tree, specs)

    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(Path(checkpoint_dir).absolute() / "params",
                               {name: target(name, tree) for name, tree in shapes.items()})
    shardings = sharding.param_shardings(config, mesh)
    if shape.stage > 1:
        layers = [params.pop(f"h_{i}") for i in range(config.n_layers)]
        params["stages"] = stack_placed_layers(layers, shardings["stages"])
    rest = {k: v for k, v in params.items() if k != "stages" and not k.startswith("h_")}
    rest = jax.jit(lambda p: sharding.arrange_params(config, p, mesh),
                   out_shardings={k: shardings[k] for k in rest})(rest)
    return config, {**params, **rest}
