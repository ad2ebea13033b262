"""Megatron-LM checkpoints: tensor/pipeline parts, QKV orders of every checkpoint_version, padded vocab, bad files.

The checkpoints are written here from a random Hugging Face GPT-2 (tests/checkpoint_writers.py), converted with
the real command line, and must give Hugging Face's greedy tokens exactly.
"""

from __future__ import annotations

import argparse
import copy
import io
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch

import gptjax
from checkpoint_writers import convert_failure, padded_vocab, write_megatron
from checkpoints import megatron
from checkpoints.megatron import read_megatron
from conftest import hf_greedy, run_cli
from gptjax import cli
from gptjax.engine import Engine
from gptjax.planning import format_bytes

PROMPTS = [[464, 2068, 7586, 21831, 18045, 625, 262, 16931], [15496, 995], [40, 588, 257, 1310, 286]]
N_NEW = 10


@pytest.fixture(scope="module")
def expected(hf_model):
    return [hf_greedy(hf_model, p, N_NEW) for p in PROMPTS]


def greedy(engine):
    return [r.output_ids for r in engine.generate(PROMPTS, max_new_tokens=N_NEW, greedy=True, stop_token_ids=[])]


@pytest.fixture(scope="module")
def tp2_dir(hf_model, tmp_path_factory):
    """Two tensor-parallel parts, checkpoint_version 3 with args, converted by the command line."""
    root = tmp_path_factory.mktemp("megatron") / "tp2"
    write_megatron(hf_model, root, tp=2, version=3.0)
    dst = root.parent / "converted"
    run_cli("convert", "megatron", str(root), str(dst))
    return dst


def test_two_tensor_parallel_parts_give_hugging_face_tokens(tp2_dir, expected):
    engine = Engine.load(tp2_dir)
    assert engine.config.vocab_size == 50257 and engine.config.n_heads == 4
    assert greedy(engine) == expected


@pytest.mark.parametrize("case", [
    # one part, version 3, args naming GPT-2's tokenizer: the padding rows go without --vocab-size
    dict(write=dict(tp=1, version=3.0), src="root", flags=[]),
    # two parts of version 0 (all Q, all K, all V per part), no args, old names and file name, iter_ folder
    dict(write=dict(tp=2, version=0, with_args=False, new_names=False, file_name="model_rng.pt", iteration=100),
         src="iter_0000100", flags=["--num-heads", "4", "--vocab-size", "50257"]),
    # two tensor x two pipeline parts, version 1 (per head: all q dims, then k, then v interleaved by dim)
    dict(write=dict(tp=2, pp=2, version=1.0), src="root", flags=[]),
], ids=["tp1-v3", "tp2-v0-noargs", "tp2-pp2-v1"])
def test_layouts_give_hugging_face_tokens(hf_model, expected, tmp_path, case):
    root = tmp_path / "megatron"
    write_megatron(hf_model, root, **case["write"])
    src = root if case["src"] == "root" else root / case["src"]
    run_cli("convert", "megatron", str(src), str(tmp_path / "out"), *case["flags"])
    assert greedy(Engine.load(tmp_path / "out")) == expected


def zip_release(root, archive, compression=zipfile.ZIP_DEFLATED):
    """The checkpoint folder as NVIDIA ships a release: one zip, paths relative to the folder."""
    with zipfile.ZipFile(archive, "w", compression) as zf:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(root).as_posix())
    return archive


def test_the_release_archive_converts_like_its_folder(hf_model, expected, tmp_path):
    root = write_megatron(hf_model, tmp_path / "megatron", tp=2, version=3.0)
    archive = zip_release(root, tmp_path / "megatron_lm_345m_v0.0.zip")
    with zipfile.ZipFile(archive) as zf:
        assert "release/mp_rank_00/model_optim_rng.pt" in zf.namelist()
    _, from_folder = read_megatron(root)
    _, from_zip = read_megatron(archive)
    jax.tree.map(np.testing.assert_array_equal, from_zip, from_folder)
    assert cli.main(["convert", "megatron", str(archive), str(tmp_path / "out")]) == 0
    assert greedy(Engine.load(tmp_path / "out")) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["megatron", "megatron_lm_345m_v0.0.zip", "out"]


@pytest.mark.parametrize("prefix", ["/", "../", "release/../../"])
def test_an_archive_naming_files_outside_itself_is_refused(capsys, good, tmp_path, prefix):
    """The parts are read where they unpack: a name that points elsewhere (absolute, or climbing out with ..)
    would have the converter read that folder of this machine instead."""
    archive = tmp_path / "release.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(good.rglob("*.pt")):
            zf.writestr(prefix + f.relative_to(tmp_path).as_posix(), b"not a checkpoint")
    line = convert_fails(capsys, tmp_path, archive, "--num-heads", "4")
    assert f"{archive}: member {prefix}" in line and "is not a relative path inside the archive" in line


def test_an_archive_that_would_not_fit_the_disk_is_refused_before_unpacking(capsys, monkeypatch, good, tmp_path):
    """The release zip is unpacked beside the output, and nothing bounded how much it wrote there: an archive
    larger than the free space filled the disk before anything was read."""
    archive = zip_release(good.parent, tmp_path / "release.zip")
    with zipfile.ZipFile(archive) as zf:
        size = sum(info.file_size for info in zf.infolist())
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        return SimpleNamespace(total=10**9, used=10**9 - 4096, free=4096)

    monkeypatch.setattr(megatron.shutil, "disk_usage", disk_usage)
    line = convert_fails(capsys, tmp_path, archive, "--num-heads", "4")
    assert asked == [tmp_path]
    assert (f"{archive}: would unpack {format_bytes(size)} into {tmp_path}, but only 4.0 KiB (4096 bytes) are "
            "free there") in line


def test_a_zip_bomb_is_refused_before_unpacking(capsys, monkeypatch, tmp_path):
    """64 MiB of zeros deflate to 64 KiB: an archive can claim far more than any disk, which was unpacked in full
    (here only to be found not to be a checkpoint). Weights never compress past MAX_RATIO."""
    archive = tmp_path / "release.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("latest_checkpointed_iteration.txt", "release")
        with zf.open("release/mp_rank_00/model_optim_rng.pt", "w") as f:
            for _ in range(64):
                f.write(bytes(1 << 20))
    assert archive.stat().st_size * megatron.MAX_RATIO < 64 << 20

    def extract(*args):
        raise AssertionError("unpacked")

    monkeypatch.setattr(zipfile.ZipFile, "extract", extract)
    line = convert_fails(capsys, tmp_path, archive, "--num-heads", "4")
    assert f"{archive}: would unpack 64.0 MiB ({(64 << 20) + 7} bytes) from " in line
    assert "more than weights ever compress to, at most 100:1): a zip bomb or a damaged archive" in line


def test_transformer_engine_extra_state_is_left_unread(hf_model, tmp_path):
    """TransformerEngine keeps FP8 metadata in `_extra_state` entries, each an io.BytesIO holding a torch.save of
    its own: the part was refused as a pickle that may run code. They hold no weights: each now loads as a
    placeholder, its bytes never unpickled (these would run code), and the model is the one without them."""
    marker = tmp_path / "ran"
    write_megatron(hf_model, tmp_path / "plain")
    write_megatron(hf_model, tmp_path / "te")

    def add_extra_state(state):
        fp8 = io.BytesIO()
        torch.save({"scale_fwd": torch.ones(3), "extra_fp8_variables": _RunsCode(marker)}, fp8)
        stack = state["model"]["language_model"]["encoder"]
        stack["layers.0.self_attention.core_attention._extra_state"] = fp8
        stack["layers.1.mlp._extra_state"] = io.BytesIO()  # no FP8 recipe: an empty one

    _edit_state(tmp_path / "te" / "release" / "mp_rank_00" / "model_optim_rng.pt", add_extra_state)
    _, with_extra_state = read_megatron(tmp_path / "te")
    _, plain = read_megatron(tmp_path / "plain")
    jax.tree.map(np.testing.assert_array_equal, with_extra_state, plain)
    assert not marker.exists()


def test_every_version_orders_qkv_the_same(hf_model, tmp_path):
    ref = None
    for version in (0, 1.0, 2.0, 3.0):
        root = tmp_path / f"v{version}"
        write_megatron(hf_model, root, tp=2, version=version)
        config, params = read_megatron(root)
        qkv = params["h_1"]["qkv"]
        hf = hf_model.state_dict()
        np.testing.assert_array_equal(qkv["kernel"].reshape(64, -1), hf["transformer.h.1.attn.c_attn.weight"].numpy())
        np.testing.assert_array_equal(qkv["bias"].reshape(-1), hf["transformer.h.1.attn.c_attn.bias"].numpy())
        ref = ref or config
        assert config == ref


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parts_keep_their_dtype(hf_model, tmp_path, dtype):
    write_megatron(hf_model, tmp_path / "m", tp=2, dtype=dtype)
    config, params = read_megatron(tmp_path / "m")
    name = str(dtype).removeprefix("torch.")
    assert config.dtype == name and params["h_0"]["qkv"]["kernel"].dtype.name == name
    wte = hf_model.state_dict()["transformer.wte.weight"].numpy()
    np.testing.assert_allclose(params["wte"].astype(np.float32), wte, atol=1e-2)


def test_padding_is_kept_without_a_vocab_size(hf_model, tmp_path):
    write_megatron(hf_model, tmp_path / "m", tp=2, version=0, with_args=False)
    config, params = read_megatron(tmp_path / "m", num_heads=4)
    assert config.vocab_size == padded_vocab(50257, 2) == params["wte"].shape[0]


def test_restored_on_a_stage_and_tensor_mesh_gives_the_same_tokens(tp2_dir, expected):
    engine = Engine.load(tp2_dir, mesh=gptjax.make_mesh(data=1, stage=2, tensor=4))
    assert greedy(engine) == expected


# ---- bad input: exit 2, one line, nothing left behind ------------------------------------------------------
def test_without_the_fused_bias_gelu_the_exact_gelu_is_kept(hf_model, tmp_path):
    """Megatron's fused bias-GELU (its default) is the tanh form; --no-bias-gelu-fusion runs F.gelu (erf)."""
    from transformers import GPT2LMHeadModel

    config = copy.deepcopy(hf_model.config)
    config.activation_function = "gelu"
    exact = GPT2LMHeadModel(config).eval()
    exact.load_state_dict(hf_model.state_dict())
    write_megatron(exact, tmp_path / "m", args={"bias_gelu_fusion": False, "openai_gelu": False})
    run_cli("convert", "megatron", str(tmp_path / "m"), str(tmp_path / "out"))
    engine = Engine.load(tmp_path / "out")
    assert engine.config.activation == "gelu"
    assert greedy(engine) == [hf_greedy(exact, p, N_NEW) for p in PROMPTS]


@pytest.mark.parametrize("field, value, needs", [
    ("position_embedding_type", "rope", "learned position embeddings"),
    ("swiglu", True, "a GELU MLP"),
    ("squared_relu", True, "a GELU MLP"),
    ("apply_layernorm_1p", True, "LayerNorm weights stored as they are used"),
    ("untie_embeddings_and_output_weights", True, "an LM head tied to the embeddings"),
])
def test_args_that_change_the_math_are_refused(capsys, hf_model, tmp_path, field, value, needs):
    write_megatron(hf_model, tmp_path / "m", args={field: value})
    line = convert_fails(capsys, tmp_path, tmp_path / "m")
    assert f"args.{field}={value!r} is not supported (this model needs {needs}" in line


def convert_fails(capsys, tmp_path, src, *flags) -> str:
    return convert_failure(capsys, tmp_path, "megatron", src, *flags)


@pytest.fixture
def good(hf_model, tmp_path):
    """A two-part checkpoint without args (version 0); returns its release folder."""
    write_megatron(hf_model, tmp_path / "m", tp=2, version=0, with_args=False, new_names=False)
    return tmp_path / "m" / "release"


def _edit(path, change):
    state = torch.load(path, weights_only=True)
    change(state["model"]["language_model"]["transformer"])
    torch.save(state, path)


def test_truncated_part(capsys, tmp_path, good):
    f = good / "mp_rank_01" / "model_optim_rng.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    line = convert_fails(capsys, tmp_path, good, "--num-heads", "4")
    assert "mp_rank_01" in line and "cannot read" in line


def test_damaged_archive(capsys, tmp_path, good):
    archive = zip_release(good.parent, tmp_path / "release.zip", zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    at = data.index(b"mp_rank_01/model_optim_rng.pt") + 200  # inside that member's data
    data[at : at + 64] = bytes(64)
    archive.write_bytes(bytes(data))
    line = convert_fails(capsys, tmp_path, archive, "--num-heads", "4")
    assert f"{archive}: cannot unpack release/mp_rank_01/model_optim_rng.pt" in line
    archive.write_bytes(bytes(data[: len(data) // 2]))  # cut short: no zip directory left
    assert "cannot read" in convert_fails(capsys, tmp_path, archive, "--num-heads", "4")


def test_corrupt_part(capsys, tmp_path, good):
    (good / "mp_rank_00" / "model_optim_rng.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    assert "cannot read" in convert_fails(capsys, tmp_path, good, "--num-heads", "4")


def test_missing_tensor(capsys, tmp_path, good):
    _edit(good / "mp_rank_01" / "model_optim_rng.pt", lambda t: t.pop("layers.1.attention.dense.weight"))
    line = convert_fails(capsys, tmp_path, good, "--num-heads", "4")
    assert "mp_rank_01" in line and "layers.1.attention.dense.weight is missing" in line


def test_wrong_shape(capsys, tmp_path, good):
    def change(t):
        t["layers.0.mlp.dense_4h_to_h.weight"] = t["layers.0.mlp.dense_4h_to_h.weight"][:, :-1].clone()
    _edit(good / "mp_rank_00" / "model_optim_rng.pt", change)
    line = convert_fails(capsys, tmp_path, good, "--num-heads", "4")
    assert "layers.0.mlp.dense_4h_to_h.weight has shape (64, 127), expected (64, 128)" in line


def test_missing_part(capsys, hf_model, tmp_path):
    write_megatron(hf_model, tmp_path / "m", tp=2)
    shutil.rmtree(tmp_path / "m" / "release" / "mp_rank_01")
    assert "tensor=2 x pipeline=1 parts, but 1 x 1 were found" in convert_fails(capsys, tmp_path, tmp_path / "m")


def test_head_count_needed_and_checked(capsys, hf_model, tmp_path, good):
    assert "pass --num-heads" in convert_fails(capsys, tmp_path, good)
    assert "not divisible by 5 attention heads" in convert_fails(capsys, tmp_path, good, "--num-heads", "5")
    assert "can't be split over the checkpoint's 2" in convert_fails(capsys, tmp_path, good, "--num-heads", "1")
    write_megatron(hf_model, tmp_path / "args", tp=1)
    line = convert_fails(capsys, tmp_path, tmp_path / "args", "--num-heads", "8")
    assert "--num-heads 8 disagrees with the checkpoint's num_attention_heads 4" in line


def test_vocab_size_beyond_the_padding(capsys, tmp_path, good):
    line = convert_fails(capsys, tmp_path, good, "--num-heads", "4", "--vocab-size", "60000")
    assert "--vocab-size 60000" in line


def test_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no mp_rank_XX folders" in convert_fails(capsys, tmp_path, tmp_path / "empty")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "latest_checkpointed_iteration.txt").write_text("12")
    assert "iter_0000012" in convert_fails(capsys, tmp_path, tmp_path / "t")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    part = tmp_path / "m" / "release" / "mp_rank_00"
    part.mkdir(parents=True)
    torch.save({"model": {"language_model": {}}, "args": argparse.Namespace(), "evil": _RunsCode(marker)},
               part / "model_optim_rng.pt")
    proc = run_cli("convert", "megatron", str(part.parent), str(tmp_path / "out"), check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "refusing to load" in lines[0], proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_non_finite_weights_are_refused_naming_the_part_and_tensor(capsys, tmp_path, good):
    def change(t):
        t["layers.1.attention.dense.weight"][3, 0] = float("inf")
    _edit(good / "mp_rank_01" / "model_optim_rng.pt", change)
    line = convert_fails(capsys, tmp_path, good, "--num-heads", "4")
    assert "mp_rank_01/model_optim_rng.pt: tensor layers.1.attention.dense.weight holds inf at [3, 0]" in line


@pytest.mark.parametrize("field, value, words", [
    ("hidden_size", "64", "args.hidden_size must be an integer, got '64'"),
    ("num_attention_heads", [4], "args.num_attention_heads must be an integer, got [4]"),  # was a TypeError
    ("layernorm_epsilon", "1e-5", "args.layernorm_epsilon must be a number"),
    ("layernorm_epsilon", float("nan"), "layer_norm_eps must be a positive finite number, got nan"),
    ("layernorm_epsilon", 10**400, "args.layernorm_epsilon is too large a number"),  # was an OverflowError
])
def test_saved_args_of_the_wrong_type_are_refused_naming_them(capsys, hf_model, tmp_path, field, value, words):
    write_megatron(hf_model, tmp_path / "m")
    path = tmp_path / "m" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    setattr(state["args"], field, value)
    torch.save(state, path)
    assert words in convert_fails(capsys, tmp_path, tmp_path / "m")


# ---- parts whose layout is not Megatron-LM's: refused naming what is wrong (these were tracebacks, a fill of
# memory, or a silently different model) ----------------------------------------------------------------------
def _edit_state(path, change):
    state = torch.load(path, weights_only=False)
    change(state)
    torch.save(state, path)


def _stack(state):
    return state["model"]["language_model"]["transformer"]


def _put(state, keys, value):
    """state[k0][k1]...[kn] = value, or value(what was there) when value is a function."""
    *outer, last = keys
    for k in outer:
        state = state[k]
    state[last] = value(state[last]) if callable(value) else value


LM, WEIGHTS = ("model", "language_model"), ("model", "language_model", "transformer")


@pytest.mark.parametrize("keys, value, words", [
    (("checkpoint_version",), 4.0, "checkpoint_version 4.0 is not one of Megatron-LM's 0, 1, 2, 3"),
    (("checkpoint_version",), float("nan"), "checkpoint_version nan is not one of"),
    (("checkpoint_version",), "abc", "checkpoint_version 'abc' is not one of"),  # was "could not convert string"
    (("checkpoint_version",), [3], "checkpoint_version [3] is not one of"),
    ((*LM, "transformer"), [1], "model.language_model.transformer is list, expected a dict"),
    ((*WEIGHTS, 5), torch.zeros(1), "model.language_model.transformer has the key 5, not a tensor name"),
    ((*LM, "embedding"), [1], "model.language_model.embedding is list, expected a dict"),
    ((*LM, "embedding", "position_embeddings", "weight"), [1.0],
     "tensor embedding.position_embeddings.weight is list, expected a tensor"),
    ((*LM, "embedding", "word_embeddings", "weight"), torch.zeros(()),
     "tensor embedding.word_embeddings.weight has shape (), expected 2 dimensions"),
    (("model",), [1], "'model' is list, expected a dict"),
    (("model",), {"decoder.layers.0.self_attention.linear_qkv.weight": torch.zeros(1)},
     "holds a Megatron-core model (model.decoder.layers...), which is not supported"),
    (("model",), {"decoder.layers.0.self_attention.linear_qkv.weight": torch.zeros(1),
                  "decoder.layers.0.self_attention.linear_qkv._extra_state": io.BytesIO(b"fp8 metadata")},
     "holds a Megatron-core model (model.decoder.layers...), which is not supported"),  # was: may run code
    ((*WEIGHTS, "layers.0.attention.dense.weight"), lambda t: t.to_sparse(),
     "tensor layers.0.attention.dense.weight is a sparse_coo tensor, expected dense weights"),
], ids=["version-4", "version-nan", "version-str", "version-list", "stack-list", "int-key", "embedding-list",
        "wpe-list", "wte-scalar", "model-list", "megatron-core", "megatron-core-te", "sparse"])
def test_a_part_laid_out_otherwise_is_refused_naming_the_entry(capsys, tmp_path, good, keys, value, words):
    """Versions other than 0-3 were read as 2 and 3 are (another QKV order: a different model); the others were
    tracebacks (AttributeError, TypeError) or named nothing."""
    _edit_state(good / "mp_rank_00" / "model_optim_rng.pt", lambda state: _put(state, keys, value))
    line = convert_fails(capsys, tmp_path, good, "--num-heads", "4")
    assert "mp_rank_00/model_optim_rng.pt" in line and words in line, line


def test_a_layer_number_far_past_the_others_is_refused_at_once(capsys, tmp_path, good):
    """The check for missing layers built set(range(highest + 1)): a key layers.999999999999.x filled memory."""
    _edit_state(good / "mp_rank_01" / "model_optim_rng.pt",
                lambda s: _stack(s).__setitem__("layers.999999999999.input_layernorm.weight", torch.zeros(64)))
    line = convert_fails(capsys, tmp_path, good, "--num-heads", "4")
    assert "mp_rank_01/model_optim_rng.pt: layer 2 is missing (the part holds layers up to 999999999999)" in line


def test_tensor_parallel_parts_holding_different_layers_are_refused(capsys, tmp_path, good):
    """Rank 0's layer count was taken for all: rank 1's extra layer was dropped without a word."""
    def add_layer(state):
        stack = _stack(state)
        stack.update({k.replace("layers.1.", "layers.2."): v.clone() for k, v in stack.items()
                      if k.startswith("layers.1.")})
    _edit_state(good / "mp_rank_01" / "model_optim_rng.pt", add_layer)
    line = convert_fails(capsys, tmp_path, good, "--num-heads", "4")
    assert "mp_rank_01/model_optim_rng.pt holds 3 layers, but mp_rank_00/model_optim_rng.pt holds 2" in line


def test_parts_named_with_and_without_a_stage_are_refused(capsys, tmp_path, good):
    """mp_rank_00 and mp_rank_00_000 are both part (0, 0): one of them was dropped without a word."""
    shutil.copytree(good / "mp_rank_00", good / "mp_rank_00_000")
    line = convert_fails(capsys, tmp_path, good, "--num-heads", "4")
    assert "holds both mp_rank_XX and mp_rank_XX_YYY folders" in line


def test_a_last_stage_whose_head_is_not_the_embedding_is_refused(capsys, hf_model, tmp_path):
    """With pipeline stages the last one keeps its own copy of the word embeddings for the LM head; one that
    differs is an output layer of its own, which this model would have replaced by the first stage's."""
    write_megatron(hf_model, tmp_path / "m", tp=2, pp=2)
    last = tmp_path / "m" / "release" / "mp_rank_01_001" / "model_optim_rng.pt"
    _edit_state(last, lambda s: s["model"]["word_embeddings_for_head"]["weight"].mul_(1.5))
    line = convert_fails(capsys, tmp_path, tmp_path / "m")
    assert "mp_rank_01_001/model_optim_rng.pt: tensor word_embeddings_for_head.weight differs from the word" in line
