"""Hugging Face GPT-2 folders and PyTorch pickles that are damaged or hostile: `gptjax convert` exits 2 with one
line naming the file, tensor or field, runs nothing from the file, and leaves nothing behind.

(Megatron-LM parts: tests/test_megatron.py; converted folders: tests/test_checkpoint.py; the Hub:
tests/test_hub.py.)
"""

from __future__ import annotations

import io
import pickle
import shutil
import zipfile

import pytest
import torch

from checkpoint_writers import convert_failure, write_megatron
from conftest import run_cli
from gptjax import cli


class _RunsCode:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def hf_folder(hf_dir, folder, state=None, weights="pytorch_model.bin"):
    """hf_dir's config.json with `state` as its weights (torch.save, or safetensors), or none."""
    folder.mkdir()
    shutil.copyfile(hf_dir / "config.json", folder / "config.json")
    if weights == "pytorch_model.bin":
        torch.save(state, folder / weights)
    elif weights == "model.safetensors":
        from safetensors.torch import save_file

        save_file(state, str(folder / weights))
    return folder


@pytest.fixture(scope="module")
def state(hf_model):
    """The model's tensors as save_pretrained writes them (the tied head left out)."""
    return {k: v.detach().clone() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}


@pytest.mark.parametrize("fmt, part, protocol, words", [
    ("hf-gpt2", "pytorch_model.bin", pickle.DEFAULT_PROTOCOL, "cannot read: truncated, corrupt or not a PyTorch file"),
    ("megatron", "release/mp_rank_00/model_optim_rng.pt", 3, "refusing to load posix.system: only tensors"),
])
def test_a_plain_pickle_that_runs_code_is_refused_in_one_line(hf_dir, tmp_path, fmt, part, protocol, words):
    """pickle.dumps (protocol 3 and later, not torch.save's 2) drew torch's two-line warning before the error line.
    The real command: in-process, pytest would catch the warning."""
    marker = tmp_path / "ran"
    src = tmp_path / "src"
    (src / part).parent.mkdir(parents=True)
    shutil.copyfile(hf_dir / "config.json", src / "config.json")
    (src / part).write_bytes(pickle.dumps({"model": _RunsCode(marker)}, protocol=protocol))
    proc = run_cli("convert", fmt, str(src / "release" if fmt == "megatron" else src), str(tmp_path / "out"),
                   check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and f"{part}: {words}" in lines[0], proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_transformer_engine_extra_state_is_refused_saying_what_it_is(capsys, hf_dir, state, tmp_path):
    """TransformerEngine's FP8 metadata (an io.BytesIO) was refused as a pickle that may try to run code: safe,
    but it sent the reader looking for an attack. (Megatron-LM parts, where it belongs, leave it unread.)"""
    src = hf_folder(hf_dir, tmp_path / "src", {**state, "transformer.h.0.attn._extra_state": io.BytesIO(b"fp8")})
    line = convert_failure(capsys, tmp_path, "hf-gpt2", src)
    assert "pytorch_model.bin: holds TransformerEngine's _extra_state (io.BytesIO): FP8 metadata" in line, line


@pytest.mark.parametrize("weights, make, words", [
    ("pytorch_model.bin", lambda t: t.to_sparse(), "is a sparse_coo tensor, expected dense weights"),
    ("pytorch_model.bin", lambda t: torch.empty(t.shape, device="meta"), "is a meta tensor (saved without its values)"),
    ("pytorch_model.bin", lambda t: t.to(torch.float8_e4m3fn), "is float8_e4m3fn, expected one of float32"),
    ("pytorch_model.bin", lambda t: t.to(torch.complex32), "is complex32, expected one of float32"),
    ("model.safetensors", lambda t: t.to(torch.float8_e5m2), "is float8_e5m2, expected one of float32"),
], ids=["sparse", "meta", "float8", "complex32", "safetensors-float8"])
@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_a_tensor_numpy_can_not_hold_is_refused_naming_it(capsys, hf_dir, state, tmp_path, weights, make, words):
    """These were TypeError tracebacks from torch (the safetensors one an AttributeError naming numpy only)."""
    name = "transformer.h.1.attn.c_proj.weight"
    src = hf_folder(hf_dir, tmp_path / "src", {**state, name: make(state[name])}, weights)
    assert f"tensor {name} {words}" in convert_failure(capsys, tmp_path, "hf-gpt2", src)


def test_a_key_that_is_not_a_tensor_name_is_refused(capsys, hf_dir, state, tmp_path):
    src = hf_folder(hf_dir, tmp_path / "src", {**state, 7: state["transformer.wte.weight"]})
    assert "pytorch_model.bin: key 7 is not a tensor name" in convert_failure(capsys, tmp_path, "hf-gpt2", src)


@pytest.mark.parametrize("text, words", [
    ("[" * 100_000, "config.json: not a config: nested too deeply"),  # was a RecursionError traceback
    ('{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 50257, "n_positions": 128, '
     '"layer_norm_epsilon": 1' + "0" * 400 + "}", "config.json: layer_norm_epsilon is too large a number"),  # Overflow
], ids=["nested", "huge-epsilon"])
def test_a_config_json_python_can_not_hold_is_refused_naming_it(capsys, tmp_path, text, words):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(text)
    assert words in convert_failure(capsys, tmp_path, "hf-gpt2", src)


def test_a_safetensors_index_nested_too_deeply_is_refused_naming_it(capsys, hf_dir, tmp_path):
    src = hf_folder(hf_dir, tmp_path / "src", weights=None)
    (src / "model.safetensors.index.json").write_text("[" * 100_000)
    line = convert_failure(capsys, tmp_path, "hf-gpt2", src)
    assert "model.safetensors.index.json: not a safetensors index (RecursionError" in line


def test_an_existing_output_folder_is_refused_before_any_weight_is_read(capsys, hf_dir, tmp_path):
    """It was refused only once every weight had been read (minutes, for a large model): here the weights are
    damaged, and the message was theirs."""
    src = hf_folder(hf_dir, tmp_path / "src", weights=None)
    (src / "model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert cli.main(["convert", "hf-gpt2", str(src), str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"gptjax convert: error: output folder {out} already exists"]
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def cut_a_record(path, keep=16) -> tuple[str, int]:
    """The torch zip file `path` rewritten with its smallest tensor record cut to `keep` bytes (a small one: the
    bytes its tensor claims then still lie inside the file); returns that record's name and former size."""
    with zipfile.ZipFile(path) as zf:
        members = [(info.filename, zf.read(info)) for info in zf.infolist()]
    name, data = min(((n, d) for n, d in members if "/data/" in n and len(d) > keep), key=lambda m: len(m[1]))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for n, d in members:
            zf.writestr(n, d[:keep] if n == name else d)
    return name, len(data)


@pytest.mark.parametrize("fmt", ["hf-gpt2", "megatron"])
def test_a_tensor_record_cut_short_is_refused_naming_it(capsys, hf_dir, hf_model, state, tmp_path, fmt):
    """torch.load(mmap=True) takes as many bytes as the pickle says from where the record starts, and checks no
    size: the tensor got the bytes of the records after it (a silently different model, or NaN by chance)."""
    if fmt == "hf-gpt2":
        src = hf_folder(hf_dir, tmp_path / "src", state)
        part, given = src / "pytorch_model.bin", src
    else:
        given = write_megatron(hf_model, tmp_path / "src", tp=1)
        part = given / "release" / "mp_rank_00" / "model_optim_rng.pt"
    name, size = cut_a_record(part)
    line = convert_failure(capsys, tmp_path, fmt, given)
    assert f"{part}: cannot read: record {name} holds 16 bytes, but its tensor takes {size}" in line, line
