"""The server's config files: TOML/JSON tables and Triton's config.pbtxt, mapped onto the engine config."""

from __future__ import annotations

import pytest

from gptjax.config import MeshShape, preset
from serving.config import ConfigError, server_config_from_file


def test_fastertransformer_knobs_map_onto_the_engine_config(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text("""
[fastertransformer]
top_k = 1
top_p = 0.0
tensor_para_size = 4
layer_para_size = 2
max_seq_len = 128
is_half = 1
head_num = 8
size_per_head = 16
vocab_size = 50257
decoder_layers = 4
batch_size = 16
is_fuse_QKV = 1
layer_para_batch_size = 4

[engine]
decode_steps_per_call = 2

[server]
drain_timeout_s = 5
""")
    cfg = server_config_from_file(path)
    e = cfg.engine
    assert (e.top_k, e.top_p, e.max_seq_len, e.max_slots, e.max_batch_size, e.decode_steps_per_call) == \
        (1, 1.0, 128, 16, 16, 2)
    assert e.mesh == MeshShape(data=1, stage=2, tensor=4)
    assert cfg.dtype == "float16" and cfg.drain_timeout_s == 5
    cfg.check_model(preset("gpt2-tiny"))  # 8 heads of 16, 4 layers, 50257 tokens


def test_engine_table_wins_and_a_wrong_model_is_named(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text('[fastertransformer]\nbatch_size = 16\nhead_num = 12\ndecoder_layers = 4\n'
                    '[engine]\nmax_slots = 4\n')
    cfg = server_config_from_file(path)
    assert (cfg.engine.max_slots, cfg.engine.max_batch_size) == (4, 16)
    with pytest.raises(ConfigError, match="n_heads=12 but the model has 8"):
        cfg.check_model(preset("gpt2-tiny"))


def test_triton_pbtxt_is_read(tmp_path):
    path = tmp_path / "config.pbtxt"
    path.write_text('name: "fastertransformer"\nbackend: "fastertransformer"\nparameters {\n  key: "top_k"\n'
                    '  value: {\n    string_value: "40"\n  }\n}\nparameters { key: "top_p" value: '
                    '{ string_value: "0.9" } }\nparameters { key: "tensor_para_size" value: { string_value: "2" } }\n')
    cfg = server_config_from_file(path)
    assert (cfg.engine.top_k, cfg.engine.top_p, cfg.engine.mesh.tensor) == (40, 0.9, 2)


@pytest.mark.parametrize("text, word", [
    ("[fastertransformer]\ntop_kk = 1\n", "top_kk"),
    ("[engine]\nmax_slotz = 1\n", "max_slotz"),
    ("[model]\n", "model"),
    ("[fastertransformer]\nis_half = 3\n", "is_half"),
    ("[fastertransformer]\nbatch_size = 'many'\n", "batch_size"),
    ("[engine]\nmax_slots = 0\n", "max_slots"),
    ("[fastertransformer\n", "server.toml"),
])
def test_bad_config_files_name_the_problem(tmp_path, text, word):
    path = tmp_path / "server.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=word):
        server_config_from_file(path)
