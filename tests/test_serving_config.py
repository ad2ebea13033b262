"""The server's config files: TOML/JSON tables and Triton's config.pbtxt, mapped onto the engine, scheduler and
server configs."""

from __future__ import annotations

import types

import pytest

from gptjax.config import EngineConfig, MeshShape, preset
from serving.config import ConfigError, serving_config_from_file


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

[scheduler]
decode_steps_per_call = 2

[server]
drain_timeout_s = 5
""")
    cfg = serving_config_from_file(path)
    e = cfg.engine
    assert (e.top_k, e.top_p, e.max_seq_len, e.max_slots, cfg.server.max_batch_size) == (1, 1.0, 128, 16, 16)
    assert cfg.scheduler.decode_steps_per_call == 2
    assert e.mesh == MeshShape(data=1, stage=2, tensor=4)
    assert cfg.dtype == "float16" and cfg.server.drain_timeout_s == 5
    cfg.check_model(preset("gpt2-tiny"))  # 8 heads of 16, 4 layers, 50257 tokens


def test_engine_table_wins_and_a_wrong_model_is_named(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text('[fastertransformer]\nbatch_size = 16\nhead_num = 12\ndecoder_layers = 4\n'
                    '[engine]\nmax_slots = 4\n')
    cfg = serving_config_from_file(path)
    assert (cfg.engine.max_slots, cfg.server.max_batch_size) == (4, 16)
    with pytest.raises(ConfigError, match="n_heads=12 but the model has 8"):
        cfg.check_model(preset("gpt2-tiny"))


def test_triton_pbtxt_is_read(tmp_path):
    path = tmp_path / "config.pbtxt"
    path.write_text('name: "fastertransformer"\nbackend: "fastertransformer"\nparameters {\n  key: "top_k"\n'
                    '  value: {\n    string_value: "40"\n  }\n}\nparameters { key: "top_p" value: '
                    '{ string_value: "0.9" } }\nparameters { key: "tensor_para_size" value: { string_value: "2" } }\n')
    cfg = serving_config_from_file(path)
    assert (cfg.engine.top_k, cfg.engine.top_p, cfg.engine.mesh.tensor) == (40, 0.9, 2)


@pytest.mark.parametrize("text, word", [
    ("[fastertransformer]\ntop_kk = 1\n", "top_kk"),
    ("[engine]\nmax_slotz = 1\n", "max_slotz"),
    ("[model]\n", "model"),
    ("[fastertransformer]\nis_half = 3\n", "is_half"),
    ("[fastertransformer]\nbatch_size = 'many'\n", "batch_size"),
    ("[engine]\nmax_slots = 0\n", "max_slots"),
    ("[engine]\ndecode_steps_per_call = 2\n", "decode_steps_per_call belongs in the \\[scheduler\\] table"),
    ("[server]\nmax_slots = 2\n", "max_slots belongs in the \\[engine\\] table"),
    ("[server]\nport = 9000\n", "--port"),
    ("[scheduler]\nbatch_window_ms = 5000\n", "batch_window_ms"),
    ("[server]\ndialect = 'v2'\n", "dialect"),
    ("[server]\nhttp_body_timeout_s = 0\n", "http_body_timeout_s"),
    ("[server]\nmax_http_requests = -1\n", "max_http_requests"),
    ("[fastertransformer\n", "server.toml"),
])
def test_bad_config_files_name_the_problem(tmp_path, text, word):
    path = tmp_path / "server.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=word):
        serving_config_from_file(path)


# ---- Triton config.pbtxt files as the FasterTransformer backend's examples write them ----------------------------
def pbtxt(inputs=(), outputs=(), max_batch_size=None, **parameters) -> str:
    """A Triton model config in protobuf text format, with the layout of the backend's example configs."""
    lines = ['# a model config', 'name: "fastertransformer"', 'backend: "fastertransformer"',
             'default_model_filename: "gpt_345M"']
    if max_batch_size is not None:
        lines.append(f"max_batch_size: {max_batch_size}")
    for block, names in (("input", inputs), ("output", outputs)):
        if names:
            entries = [f'  {{\n    name: "{n}"\n    data_type: TYPE_UINT32\n    dims: [ -1 ]\n  }}' for n in names]
            lines.append(f"{block} [\n" + ",\n".join(entries) + "\n]")
    lines.append('instance_group [\n  {\n    count: 1\n    kind : KIND_CPU\n  }\n]')
    lines.append("dynamic_batching { max_queue_delay_microseconds: 50000 }")
    for key, value in parameters.items():
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{\n    string_value: "{value}"\n  }}\n}}')
    return "\n".join(lines) + "\n"


V1_INPUTS, V1_OUTPUTS = ("INPUT_ID", "REQUEST_INPUT_LEN", "REQUEST_OUTPUT_LEN"), ("OUTPUT0",)
V5_INPUTS = ("input_ids", "input_lengths", "request_output_len", "runtime_top_k", "request_prompt_embedding")
V5_OUTPUTS = ("output_ids", "sequence_length", "cum_log_probs")
# every parameter of the 2021 (v1) example config, at the example's values for the 345M model
V1_PARAMETERS = dict(candidate_num=1, probability_threshold="0.0", tensor_para_size=8, layer_para_size=1,
                     layer_para_batch_size=8, max_seq_len=32, is_half=1, head_num=16, size_per_head=64,
                     vocab_size=50304, decoder_layers=24, model_name="gpt_345M", batch_size=128, is_fuse_QKV=1,
                     temperature="1.0", repetition_penalty="1.0")
# the later 2021 (v1.1) example's parameters that v1 lacks
V11_PARAMETERS = dict(top_k=1, top_p="0.0", pipeline_para_size=1, max_input_len=512, max_seq_len=528,
                      inter_size=4096, start_id=50256, end_id=50256, beam_width=1, len_penalty="1.0",
                      beam_search_diversity_rate="0.0", model_type="GPT")
V5_PARAMETERS = dict(tensor_para_size=1, pipeline_para_size=1, data_type="fp16", model_type="GPT",
                     model_checkpoint_path="/data/models/GPT/Megatron/c-model/345m/1-gpu/", int8_mode=0,
                     enable_custom_all_reduce=0)


def test_the_2021_example_config_loads_unchanged(tmp_path):
    path = tmp_path / "config.pbtxt"
    path.write_text(pbtxt(V1_INPUTS, V1_OUTPUTS, max_batch_size=128, **V1_PARAMETERS))
    cfg = serving_config_from_file(path)
    e = cfg.engine
    assert cfg.server.dialect == "v1" and cfg.dtype == "float16"
    assert (e.top_k, e.top_p, e.temperature, e.max_seq_len, e.max_slots) == (1, 1.0, 1.0, 32, 128)
    assert cfg.server.max_batch_size == 128
    assert e.mesh == MeshShape(tensor=8)
    cfg.check_model(preset("megatron-345m"))  # 50304 is 50257 padded to a multiple of 128


@pytest.mark.parametrize("threshold, off", [("0.0", True), ("1.0", False), ("0.9", False)])
def test_the_config_says_whether_fastertransformer_requests_have_top_p_off(tmp_path, threshold, off):
    # candidate_num 0 with probability_threshold 0 is FasterTransformer's greedy; 1.0 samples the whole
    # distribution, where gptjax's top_p 1.0 alone would read as "off"
    path = tmp_path / "config.pbtxt"
    path.write_text(pbtxt(V1_INPUTS, V1_OUTPUTS, **dict(V1_PARAMETERS, candidate_num=0,
                                                         probability_threshold=threshold)))
    cfg = serving_config_from_file(path)
    assert cfg.server.ft_top_p_off is off and cfg.engine.top_p == (1.0 if off else float(threshold))


def test_the_v11_and_5x_example_configs_load_unchanged(tmp_path):
    path = tmp_path / "config.pbtxt"
    params = {k: v for k, v in V1_PARAMETERS.items() if k not in ("candidate_num", "probability_threshold",
                                                                   "layer_para_size")}
    path.write_text(pbtxt(V1_INPUTS, V1_OUTPUTS, max_batch_size=16, **{**params, **V11_PARAMETERS}))
    cfg = serving_config_from_file(path)
    assert (cfg.server.dialect, cfg.server.max_batch_size, cfg.engine.max_slots, cfg.engine.eos_token_id) == \
        ("v1", 16, 128, 50256)
    cfg.check_model(preset("megatron-345m"))  # inter_size 4096 = 4 x 1024

    path.write_text(pbtxt(V5_INPUTS, V5_OUTPUTS, max_batch_size=1024, **V5_PARAMETERS))
    cfg = serving_config_from_file(path)
    assert (cfg.server.dialect, cfg.dtype, cfg.server.max_batch_size) == ("5.x", "float16", 1024)
    assert cfg.scheduler.max_queued_requests == 1024  # a batch is queued whole: the default queue grows to hold it
    assert serving_config_from_file(write(tmp_path, pbtxt(top_k=2))).server.dialect == "5.x"  # none declared


def write(tmp_path, text: str, name="config.pbtxt"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("parameters, words", [
    (dict(repetition_penalty="1.2"), "repetition_penalty.*not supported"),
    (dict(beam_width=4), "beam_width.*beam search"),
    (dict(int8_mode=1), "int8_mode.*int8"),
    (dict(model_type="GPT-J"), "model_type.*GPT models only"),
    (dict(is_remove_padding=1), "unknown .*is_remove_padding"),
    (dict(candidate_num=1, top_k=4), "top_k = '4' contradicts candidate_num = '1'"),
    (dict(data_type="int4"), "data_type must be one of"),
    (dict(is_half=0, data_type="fp16"), "is_half = 0 contradicts data_type"),
    (dict(probability_threshold="1.5"), "top_p must be in"),
    (dict(max_seq_len="1.5"), "max_seq_len must be an integer"),
    (dict(temperature="nan"), "temperature must be a finite number"),
    (dict(max_input_len=64, max_seq_len=64), "max_input_len 64 must be below max_seq_len 64"),
])
def test_a_refused_parameter_is_named_with_why(tmp_path, parameters, words):
    with pytest.raises(ConfigError, match=words):
        serving_config_from_file(write(tmp_path, pbtxt(V1_INPUTS, V1_OUTPUTS, **parameters)))


def test_vocab_size_must_be_the_model_vocabulary_or_its_megatron_padding(tmp_path):
    tiny = preset("gpt2-tiny")  # 50257 tokens
    for vocab in (50257, 50304, 51200):  # exact; padded for 1 and for 8 tensor-parallel parts
        serving_config_from_file(write(tmp_path, pbtxt(vocab_size=vocab, tensor_para_size=8))).check_model(tiny)
    with pytest.raises(ConfigError, match=r"vocab_size=50305 but the model has 50257 \(padded .*50304"):
        serving_config_from_file(write(tmp_path, pbtxt(vocab_size=50305))).check_model(tiny)
    with pytest.raises(ConfigError, match=r"end_id=60000 is outside"):
        serving_config_from_file(write(tmp_path, pbtxt(end_id=60000))).check_model(tiny)


@pytest.mark.parametrize("text, words", [
    (pbtxt(("INPUT_ID", "input_ids")), "both FasterTransformer dialects"),
    (pbtxt(("prompt",)), "prompt are neither"),
    (pbtxt(max_batch_size=0), "max_batch_size must be at least 1"),
    ('name: "x"\ninput [ { name: "INPUT_ID" }\n', "line 2"),
    ('parameters { key: "top_k" }\n', "needs key and value"),
    # each of these was a Python traceback (TypeError, SyntaxError, RecursionError), not a line naming the problem
    ('parameters { key { a: 1 } value { string_value: "3" } }\n', "key and string_value must be strings"),
    ('input [ { name { a: 1 } } ]\n', "an input's name must be a string"),
    ('name: "x"\nmodel_name: "\\x"\n', "line 2: bad string"),
    ("a {" * 5000 + "}" * 5000, "line 1: messages nested more than 64 deep"),
    # FasterTransformer_backend's streaming config: its clients wait for a response a token, which never come
    (pbtxt() + "model_transaction_policy { decoupled: True }\n", "decoupled = True asks for several responses"),
])
def test_bad_pbtxt_structure_is_named(tmp_path, text, words):
    with pytest.raises(ConfigError, match=words):
        serving_config_from_file(write(tmp_path, text))


def test_serve_exits_2_naming_a_refused_key(tmp_path):
    from conftest import run_cli

    path = write(tmp_path, pbtxt(V1_INPUTS, V1_OUTPUTS, **{**V1_PARAMETERS, "repetition_penalty": "1.3"}))
    proc = run_cli("serve", "--config", str(path), "--port", "0", check=False, timeout=120)
    assert proc.returncode == 2
    assert "repetition_penalty" in proc.stderr and "not supported" in proc.stderr


def test_a_queue_set_below_the_batch_limit_caps_the_batch(tmp_path):
    """A KServe batch is queued whole, so a file's smaller queue is the batch limit too (refused at once, naming it,
    rather than as a full queue to retry)."""
    from serving.frontend import Limits

    cfg = serving_config_from_file(write(tmp_path, "[scheduler]\nmax_queued_requests = 16\n[server]\n"
                                                   "max_batch_size = 32\n", "server.toml"))
    assert (cfg.scheduler.max_queued_requests, cfg.server.max_batch_size) == (16, 32)
    engine = types.SimpleNamespace(engine_config=EngineConfig(), max_seq_len=128, config=preset("gpt2-tiny"))
    assert Limits.of(engine, cfg.scheduler.max_queued_requests, cfg.server.max_batch_size).max_batch_size == 16


@pytest.mark.parametrize("line, words", [("temperature = -1.0", "temperature must be a finite number >= 0, got -1.0"),
                                         ("top_k = -1", "top_k must be a whole number >= 0, got -1"),
                                         ("max_seq_len = -5", "max_seq_len and max_new_tokens_limit must not")])
def test_negative_engine_values_are_refused_at_load(tmp_path, line, words):
    with pytest.raises(ConfigError, match=words):
        serving_config_from_file(write(tmp_path, f"[engine]\n{line}\n", "server.toml"))


def test_unusual_but_valid_pbtxt_is_read(tmp_path):
    """Comments, both quote styles, escapes, adjacent strings (one string, as protobuf reads them), `<>` messages,
    `;` separators and a repeated parameter (the last wins, as protobuf's map)."""
    text = ("# a comment\nname: 'fast\\'er' # trailing comment\n"
            "parameters < key: 'top_k' value < string_value: \"\\061\" > >;\n"
            'parameters { key: "te" "nsor_para_size" value: { string_value: "2" } }\n'
            'parameters { key: "top_p" value { string_value: "0.5" } }\n'
            'parameters { key: "top_p" value { string_value: "0.25" } }\n'
            "max_batch_size: 4; input [ { name: 'INPUT_ID' } ]\n")
    cfg = serving_config_from_file(write(tmp_path, text))
    assert (cfg.engine.top_k, cfg.engine.mesh.tensor, cfg.engine.top_p) == (1, 2, 0.25)
    assert (cfg.server.max_batch_size, cfg.server.dialect) == (4, "v1")


@pytest.mark.parametrize("text, words", [
    # each of these loaded: a NaN drain timeout cut every request off at once, an infinite one never did
    ("[server]\ndrain_timeout_s = nan\n", "ServerConfig.drain_timeout_s must be a finite number, got nan"),
    ("[engine]\ntemperature = inf\n", "EngineConfig.temperature must be a finite number, got inf"),
    ("[server]\nft_top_p_off = 'yes'\n", "ServerConfig.ft_top_p_off must be true or false, got 'yes'"),
    ("[engine]\nmesh = {tensor = 0}\n", "mesh.tensor must be an integer of at least 1, got 0"),  # ran on one device
    ("[engine]\nmesh = 4\n", "mesh must be text like"),  # an AttributeError traceback
    # OverflowError tracebacks: from the check itself (int(inf)), or from gRPC, which takes C ints
    ("[server]\nkeepalive_time_s = inf\n", "ServerConfig.keepalive_time_s must be a finite number, got inf"),
    ("[server]\nkeepalive_time_s = 1e10\n", r"ServerConfig.keepalive_time_s must be at most 2147483 s"),
    ("[server]\nmax_message_bytes = 99999999999\n", r"max_message_bytes must be at most 2147483647 \(gRPC's"),
    ("[server]\nmax_batch_sise = 4\n", r"server.toml: \[server\]: unknown ServerConfig field\(s\): max_batch_sise$"),
    ("[fastertransformer]\ntop_k = true\n", "top_k must be a number, got True"),  # was top_k 1
])
def test_out_of_range_values_are_refused_naming_the_field(tmp_path, text, words):
    with pytest.raises(ConfigError, match=words):
        serving_config_from_file(write(tmp_path, text, "server.toml"))


def test_fractions_of_a_second_are_positive(tmp_path):
    """A timeout of half a second was refused as "must be positive, got 0.5" (it was cut to an integer first)."""
    cfg = serving_config_from_file(write(tmp_path, "[server]\nkeepalive_time_s = 0.5\nstream_idle_timeout_s = 0.25\n",
                                         "server.toml"))
    assert (cfg.server.keepalive_time_s, cfg.server.stream_idle_timeout_s) == (0.5, 0.25)


def test_a_json_file_giving_a_key_twice_and_a_folder_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="server.json: the key 'max_batch_size' is given twice"):
        serving_config_from_file(write(tmp_path, '{"server": {"max_batch_size": 4, "max_batch_size": 8}}',
                                       "server.json"))  # the 8 won, silently
    (tmp_path / "conf.toml").mkdir()
    with pytest.raises(ConfigError, match="conf.toml is a folder, not a config file"):  # was "not found"
        serving_config_from_file(tmp_path / "conf.toml")


def test_an_engine_mesh_text_overrides_only_the_axes_it_gives(tmp_path):
    """[engine] mesh = "tensor=2" beside layer_para_size = 2: the stage of 2 stayed only when the mesh was a table."""
    for mesh in ('"tensor=2"', "{tensor = 2}"):
        text = f"[fastertransformer]\nlayer_para_size = 2\ntensor_para_size = 4\n[engine]\nmesh = {mesh}\n"
        cfg = serving_config_from_file(write(tmp_path, text, "server.toml"))
        assert cfg.engine.mesh == MeshShape(stage=2, tensor=2), mesh


def test_a_config_file_is_read_by_its_suffix_and_else_as_json_then_toml(tmp_path):
    """A TOML file named server.conf was read as JSON ("Expecting value: line 1 column 2 (char 1)")."""
    for name in ("server.conf", "server"):
        cfg = serving_config_from_file(write(tmp_path, "[engine]\nmax_slots = 4\n", name))
        assert cfg.engine.max_slots == 4
    cfg = serving_config_from_file(write(tmp_path, '{"engine": {"max_slots": 3}}', "server.conf"))
    assert cfg.engine.max_slots == 3


def test_serve_exits_2_saying_which_format_a_config_file_was_read_as(capsys, tmp_path):
    from gptjax import cli

    path = write(tmp_path, "[engine]\nmax_slots = 4\n", "server.json")
    assert cli.main(["serve", "--config", str(path), "--port", "0"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"gptjax serve: error: {path}: not valid JSON (its suffix .json says JSON): Expecting value: line "
                     "1 column 2 (char 1); it reads as TOML: give it the suffix .toml"]
    path = write(tmp_path, "[engine\n", "server.conf")
    assert cli.main(["serve", "--config", str(path), "--port", "0"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"gptjax serve: error: {path}: neither JSON nor TOML (as JSON: ") and "as TOML: " in line
    assert line.endswith("a file with the suffix .conf is tried as JSON, then as TOML") and "\n" not in line
