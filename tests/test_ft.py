"""FasterTransformer c-model folders (config.ini + raw model.*.bin, split per GPU) written from a random Hugging
Face GPT-2, converted with the real command line: Hugging Face's greedy tokens exactly; bad folders: exit 2."""

from __future__ import annotations

import numpy as np
import pytest

from checkpoint_writers import convert_failure, write_ft
from checkpoints.ft import read_ft
from conftest import hf_greedy, run_cli
from gptjax.engine import Engine

PROMPTS = [[464, 2068, 7586, 21831, 18045, 625, 262, 16931], [15496, 995], [40, 588, 257, 1310, 286]]


def test_two_gpu_c_model_gives_hugging_face_tokens(hf_model, tmp_path):
    write_ft(hf_model, tmp_path / "c-model", tp=2)
    # the converter's output root holds one `2-gpu` folder; either may be given
    run_cli("convert", "ft", str(tmp_path / "c-model"), str(tmp_path / "out"))
    engine = Engine.load(tmp_path / "out")
    assert engine.config.vocab_size == 50257  # Megatron's padding of GPT-2's vocabulary is dropped
    results = engine.generate(PROMPTS, max_new_tokens=10, greedy=True, stop_token_ids=[])
    assert [r.output_ids for r in results] == [hf_greedy(hf_model, p, 10) for p in PROMPTS]


def test_fp16_files_stay_fp16(hf_model, tmp_path):
    folder = write_ft(hf_model, tmp_path / "c", tp=4, weight_data_type="fp16")
    config, params = read_ft(folder)
    assert config.dtype == "float16" and params["h_1"]["qkv"]["kernel"].dtype == np.float16
    np.testing.assert_allclose(params["h_1"]["qkv"]["kernel"].reshape(64, -1).astype(np.float32),
                               hf_model.state_dict()["transformer.h.1.attn.c_attn.weight"].numpy(), atol=2e-3)


def convert_fails(capsys, tmp_path, src) -> str:
    return convert_failure(capsys, tmp_path, "ft", src)


@pytest.fixture
def folder(hf_model, tmp_path):
    return write_ft(hf_model, tmp_path / "c", tp=2)


def test_truncated_file(capsys, tmp_path, folder):
    f = folder / "model.layers.1.mlp.dense_4h_to_h.weight.1.bin"
    f.write_bytes(f.read_bytes()[:100])
    line = convert_fails(capsys, tmp_path, folder)
    assert "model.layers.1.mlp.dense_4h_to_h.weight.1.bin: 100 bytes, expected 32768" in line


def test_missing_file(capsys, tmp_path, folder):
    (folder / "model.layers.0.attention.query_key_value.bias.1.bin").unlink()
    assert "model.layers.0.attention.query_key_value.bias.1.bin is missing" in convert_fails(capsys, tmp_path, folder)


def test_config_that_does_not_match_the_files(capsys, tmp_path, folder):
    ini = folder / "config.ini"
    ini.write_text(ini.read_text().replace("head_num = 4", "head_num = 2"))  # hidden 64 -> 32
    assert "bytes, expected" in convert_fails(capsys, tmp_path, folder)
    ini.write_text(ini.read_text().replace("head_num = 2\n", ""))
    assert "field head_num is missing" in convert_fails(capsys, tmp_path, folder)
    ini.write_text("not an ini file")
    assert "config.ini" in convert_fails(capsys, tmp_path, folder)


def test_not_a_c_model(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no config.ini" in convert_fails(capsys, tmp_path, tmp_path / "empty")
