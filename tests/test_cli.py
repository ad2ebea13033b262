"""The `gptjax` command as users run it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import hf_greedy, run_cli, run_cli_here
from gptjax import cli


def test_generate_json_matches_hugging_face(hf_model, converted_dir):
    prompts = [[464, 2068, 7586, 21831], [15496, 995, 11, 314, 716, 257]]
    args = ["generate", "--checkpoint", str(converted_dir), "--max-new-tokens", "6", "--greedy", "--no-stop",
            "--json"]
    for p in prompts:
        args += ["--prompt-ids", ",".join(map(str, p))]
    rows = [json.loads(line) for line in run_cli(*args).stdout.splitlines()]
    assert [r["prompt_ids"] for r in rows] == prompts
    for row, p in zip(rows, prompts):
        assert row["output_ids"] == hf_greedy(hf_model, p, 6)
        assert isinstance(row["text"], str)


def test_generate_default_model_is_deterministic():
    a = run_cli("generate", "--prompt", "Once upon a time", "--max-new-tokens", "8", "--greedy").stdout
    b = run_cli("generate", "--prompt", "Once upon a time", "--max-new-tokens", "8", "--greedy").stdout
    assert a == b and a.startswith("Once upon a time") and len(a) > len("Once upon a time\n")


def test_bad_input_exits_2_with_one_line(tmp_path):
    """Each refused argument: exit 2 and one line naming it. The first case runs as a process of its own (nothing
    else on its stderr, the devices' start included); the others run here, where starting Python would cost more
    than the check."""
    cases = [
        ["generate", "--prompt", "x", "--mesh", "tensor=3"],
        ["generate", "--prompt-ids", "1,2,99999999"],
        ["generate", "--prompt", "x", "--max-new-tokens", "0"],
        ["generate", "--prompt", "x", "--top-p", "1.5"],
        ["generate", "--prompt", "x", "--checkpoint", str(tmp_path)],
        ["convert", "hf-gpt2", str(tmp_path / "missing"), str(tmp_path / "out")],
    ]
    for i, args in enumerate(cases):
        proc = run_cli(*args, check=False) if i == 0 else run_cli_here(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and "error" in lines[0], (args, proc.stderr)
    # bytes of the command line that are not UTF-8 (a surrogate in Python's argv): a line, not a TypeError
    proc = run_cli_here("generate", "--prompt", "abc\udcff")
    assert proc.returncode == 2 and "--prompt b'abc\\xff' is not valid UTF-8" in proc.stderr, proc.stderr
    proc = run_cli_here("generate", "--prompt-ids", "1,x")  # argparse's own usage errors
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == \
        "gptjax generate: error: argument --prompt-ids: expected comma-separated integers, got '1,x'"


def test_convert_refuses_corrupt_weights_and_leaves_nothing(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    data = (hf_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    proc = run_cli("convert", "hf-gpt2", str(broken), str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "cannot read weights" in proc.stderr
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]


class _RunsCode:
    def __reduce__(self):
        import os

        return os.system, ("true",)


def test_refusals_do_not_advise_turning_the_safety_off(capsys, hf_dir, tmp_path):
    import torch

    from checkpoint_writers import convert_failure

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    torch.save({"wte.weight": torch.randn(4, 4), "x": _RunsCode()}, src / "pytorch_model.bin")
    line = convert_failure(capsys, tmp_path, "hf-gpt2", src)
    assert "refusing to load posix.system" in line and "weights_only" not in line
    data = (src / "pytorch_model.bin").read_bytes()
    (src / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    line = convert_failure(capsys, tmp_path, "hf-gpt2", src)
    assert "pytorch_model.bin: cannot read" in line and "weights_only" not in line


def test_serve_flags(monkeypatch, capsys):
    monkeypatch.setenv("GPTJAX_API_KEY", "k-from-env")
    args = cli.build_parser().parse_args(["serve"])
    assert (args.port, args.http_port, args.metrics_port, args.api_key) == (8001, 8000, 8002, "k-from-env")
    args = cli.build_parser().parse_args(["serve", "--http-port", "0", "--metrics-port", "0", "--api-key", "k"])
    assert (args.http_port, args.metrics_port, args.api_key, args.no_compile_cache) == (0, 0, "k", False)
    assert cli.build_parser().parse_args(["bench", "--no-compile-cache"]).no_compile_cache
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["serve", "--http-port", "70000"])
    assert e.value.code == 2 and "between 0 and 65535" in capsys.readouterr().err


def hf_folder(hf_model, folder: Path, config: dict | None = None, state: dict | None = None) -> Path:
    """hf_model saved to `folder`, with its config.json fields and its tensors changed as given."""
    from safetensors.torch import save_file

    hf_model.save_pretrained(folder)
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if state:
        tensors = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
        tensors.pop("lm_head.weight")  # save_pretrained leaves the tied copy out too
        save_file({k: v.contiguous() for k, v in {**tensors, **state}.items()}, str(folder / "model.safetensors"))
    return folder


def test_an_output_layer_of_its_own_is_refused(capsys, hf_model, tmp_path):
    from checkpoint_writers import convert_failure

    src = hf_folder(hf_model, tmp_path / "untied", config={"tie_word_embeddings": False})
    capsys.readouterr()  # save_pretrained's progress bar
    assert "tie_word_embeddings=False is not supported" in convert_failure(capsys, tmp_path, "hf-gpt2", src)
    wte = hf_model.state_dict()["transformer.wte.weight"]
    src = hf_folder(hf_model, tmp_path / "other-head", state={"lm_head.weight": wte + 1.0})
    capsys.readouterr()
    line = convert_failure(capsys, tmp_path, "hf-gpt2", src)
    assert "lm_head.weight differs from transformer.wte.weight" in line


def test_a_transposed_weight_of_the_same_size_is_refused(capsys, hf_model, tmp_path):
    from checkpoint_writers import convert_failure

    weight = hf_model.state_dict()["transformer.h.0.attn.c_attn.weight"]
    src = hf_folder(hf_model, tmp_path / "transposed", state={"transformer.h.0.attn.c_attn.weight": weight.T})
    c = weight.shape[0]
    capsys.readouterr()
    assert (f"tensor transformer.h.0.attn.c_attn.weight has shape {(3 * c, c)}, expected {(c, 3 * c)}"
            in convert_failure(capsys, tmp_path, "hf-gpt2", src))


def test_a_pickle_of_parameters_converts(hf_model, tmp_path):
    """torch.save(dict(model.named_parameters())): tensors that require grad."""
    import torch

    from gptjax import sharding
    from gptjax.checkpoint import open_checkpoint

    src = tmp_path / "params"
    hf_model.config.save_pretrained(src)
    torch.save(dict(hf_model.named_parameters()), src / "pytorch_model.bin")
    assert cli.main(["convert", "hf-gpt2", str(src), str(tmp_path / "out")]) == 0
    config, restore = open_checkpoint(tmp_path / "out", sharding.default_mesh(None))
    wte = hf_model.state_dict()["transformer.wte.weight"].detach().numpy()
    np.testing.assert_array_equal(np.asarray(restore()["wte"])[: config.vocab_size], wte)


def test_an_output_folder_that_cannot_be_made_exits_2(capsys, hf_dir, tmp_path):
    (tmp_path / "a-file").write_text("")
    assert cli.main(["convert", "hf-gpt2", str(hf_dir), str(tmp_path / "a-file" / "out")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gptjax convert: error: ") and "a-file" in lines[0], lines


@pytest.mark.parametrize("config, words", [
    ({"n_layer": 1}, "config.json gives n_layer 1, but the weights hold layers 0-1"),  # a layer would be dropped
    ({"n_layer": 10**400}, "but the weights hold layers 0-1"),  # was an OverflowError traceback
    ({"n_embd": 64.9}, "n_embd must be an integer, got 64.9"),  # int() made it 64
    ({"n_head": "4"}, "n_head must be an integer, got '4'"),
    ({"vocab_size": None}, "vocab_size must be an integer, got None"),
    ({"activation_function": ["gelu"]}, "activation_function ['gelu'] is not supported"),
    ({"layer_norm_epsilon": float("nan")}, "layer_norm_eps must be a positive finite number, got nan"),
    ({"layer_norm_epsilon": -1e-5}, "layer_norm_eps must be a positive finite number"),
])
def test_a_config_json_the_weights_do_not_back_is_refused_naming_the_field(capsys, hf_model, tmp_path, config,
                                                                           words):
    from checkpoint_writers import convert_failure

    src = hf_folder(hf_model, tmp_path / "edited", config=config)
    capsys.readouterr()
    assert words in convert_failure(capsys, tmp_path, "hf-gpt2", src)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(capsys, hf_model, tmp_path, value):
    """They converted and loaded, and then every prompt was answered with token 0."""
    from checkpoint_writers import convert_failure

    weight = hf_model.state_dict()["transformer.h.1.mlp.c_fc.weight"].clone()
    weight[2, 5] = value
    src = hf_folder(hf_model, tmp_path / "bad", state={"transformer.h.1.mlp.c_fc.weight": weight})
    capsys.readouterr()
    line = convert_failure(capsys, tmp_path, "hf-gpt2", src)
    assert f"tensor transformer.h.1.mlp.c_fc.weight holds {value} at [2, 5]" in line


def test_extra_layers_are_refused(capsys, hf_model, tmp_path):
    from checkpoint_writers import convert_failure

    weight = hf_model.state_dict()["transformer.h.0.ln_1.weight"]
    src = hf_folder(hf_model, tmp_path / "extra", state={"transformer.h.5.ln_1.weight": weight})
    capsys.readouterr()
    assert "gives n_layer 2, but the weights hold layers 0-1, 5" in convert_failure(capsys, tmp_path, "hf-gpt2", src)


def parse_error(capsys, *argv) -> str:
    """The last line argparse prints for a refused command line (it exits 2)."""
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


def main_error(*argv) -> str:
    """The one line `gptjax` prints for a refused command (exit 2), run in this process."""
    proc = run_cli_here(*argv)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("ids", ["1 2", "1_0", "\u0661\u0662", "1,,2", "1,2,", "0x10", "1,--5"])
def test_prompt_ids_are_read_as_written(capsys, ids):
    """"1 2" was token 12 (the spaces taken out), "1_0" token 10, Arabic-Indic digits their number, and empty items
    were dropped."""
    assert parse_error(capsys, "generate", "--prompt-ids", ids).endswith(
        f"argument --prompt-ids: expected comma-separated integers, got {ids!r}")
    assert cli.build_parser().parse_args(["generate", "--prompt-ids", " 464, 2068 ,-5"]).prompt_ids == [[464, 2068, -5]]


@pytest.mark.parametrize("flag, value, words", [
    ("--server", "127.0.0.1:99999", "a port is between 1 and 65535, got 99999"),  # gRPC dialled port 34463
    ("--server", "127.0.0.1:", "expected HOST:PORT"),  # gRPC dialled port 443
    ("--server", "localhost", "expected HOST:PORT"),
    ("--server", "127.0.0.1:0", "a port is between 1 and 65535, got 0"),
])
def test_a_server_address_is_host_and_port(capsys, flag, value, words):
    for command in (["client"], ["bench", "--shapes", "1,4,2"]):
        assert f"argument {flag}: {words}" in parse_error(capsys, *command, flag, value)
    assert cli.build_parser().parse_args(["client", "--server", "[::1]:8001"]).server == "[::1]:8001"


@pytest.mark.parametrize("value, words", [("node0", "expected HOST:PORT"),  # an IndexError traceback
                                          ("node0:99999", "a port is between 1 and 65535"),  # an OverflowError one
                                          ("node0:port", "expected HOST:PORT")])
def test_a_coordinator_address_is_host_and_port(capsys, value, words):
    assert f"argument --coordinator: {words}" in parse_error(capsys, "generate", "--prompt", "x", "--coordinator",
                                                             value, "--num-processes", "2", "--process-id", "0")


def test_an_api_key_the_server_could_never_match_or_an_empty_one_is_refused(capsys, monkeypatch, tmp_path):
    for key in (" k", "k\n", "cl\u00e9"):  # HTTP strips spaces around a header's value; gRPC metadata is ASCII
        assert "the key (--api-key or $GPTJAX_API_KEY) must be printable ASCII" in parse_error(
            capsys, "serve", "--api-key", key)
    monkeypatch.setenv("GPTJAX_API_KEY", "k\u00e9y")
    assert "argument --api-key" in parse_error(capsys, "client", "--prompt", "x")
    monkeypatch.setenv("GPTJAX_API_KEY", "")  # a client with an empty key sends none, as before
    assert cli.build_parser().parse_args(["client", "--prompt", "x"]).api_key == ""
    # a server given an empty key served every route to anyone, as if no key had been asked for (the missing
    # config file would stop a server that got past the key)
    missing = str(tmp_path / "missing.toml")
    assert "the API key (--api-key or $GPTJAX_API_KEY) is empty" in main_error("serve", "--config", missing)
    monkeypatch.delenv("GPTJAX_API_KEY")
    assert "is empty" in main_error("serve", "--api-key", "", "--config", missing)


@pytest.mark.parametrize("argv, words", [
    # the serving benchmark's flags were ignored by the static one, and the other way round
    (["--shapes", "1,4,2", "--num-requests", "5"], "only the serving benchmark takes --num-requests"),
    (["--shapes", "1,4,2", "--input-len-dist", "fixed:3", "--seed", "1"],
     "only the serving benchmark takes --input-len-dist, --seed"),
    (["--shapes", "1,4,2", "--warmup-seconds", "1"], "only a run through a server takes --warmup-seconds"),
    (["--shapes", "1,4,2", "--server-api", "native"], "only a run through a server takes --server-api"),
    (["--server", "h:1", "--request-rate", "inf", "-n", "3"], "--request-rate runs the serving benchmark: -n do not"),
    (["--server", "h:1", "--request-rate", "inf", "--warmup", "0"], "--warmup do not apply"),
    (["--server", "h:1", "--request-rate", "inf", "--seed", "-1"], "--seed must not be negative, got -1"),  # numpy's
])
def test_bench_refuses_the_flags_of_the_other_benchmark(argv, words):
    assert words in main_error("bench", *argv)


def test_bench_warmup_seconds_are_finite(capsys):
    """inf warmed up through the server for ever."""
    assert "argument --warmup-seconds: expected a finite number of seconds >= 0, got 'inf'" in parse_error(
        capsys, "bench", "--server", "h:1", "--shapes", "1,4,2", "--warmup-seconds", "inf")


def test_an_empty_model_to_remove_is_refused(monkeypatch, tmp_path):
    """`models --rm ""` listed the models and exited 0, as if --rm had not been given."""
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path))
    assert "no converted model" in main_error("models", "--rm", "")


def test_serve_refuses_one_port_for_two_listeners(tmp_path):
    """It said "Address already in use", as if another program held the port."""
    missing = str(tmp_path / "missing.toml")  # would stop a server that got past the ports
    assert "--port and --http-port are both 8100" in main_error("serve", "--port", "8100", "--http-port",
                                                                 "8100", "--config", missing)
    assert "--http-port and --metrics-port are both 8101" in main_error("serve", "--http-port", "8101",
                                                                         "--metrics-port", "8101", "--config", missing)


def test_a_kv_cache_or_weights_that_can_not_fit_exit_2_naming_what_to_change(monkeypatch, tmp_path):
    """A server with max_slots = 100000 (or a model too large for its devices) died in an out-of-memory traceback
    when the state was allocated. Devices report their memory on GPUs (CPU devices report no limit, and are not
    checked): here they say they have 64 MiB each."""
    from gptjax import planning

    monkeypatch.setattr(planning, "device_memory", lambda devices: 64 * 2**20)
    config = tmp_path / "server.toml"
    config.write_text("[engine]\nmax_slots = 100000\n")
    # serve's own path (its servers listening first, then `build_engine`, whose ValueError serve prints as one line
    # and exits 2) imports the inference protos, which clash in a test process holding tritonclient's: the engine
    # is built here as serve builds it
    args = cli.build_parser().parse_args(["serve", "--config", str(config), "--no-compile-cache"])
    with pytest.raises(ValueError) as refused:
        cli.build_engine(args, cli.serving_config(args))
    assert str(refused.value).startswith(
        "max_slots=100000 x max_seq_len=256 (the model's n_positions): the KV cache (97.7 GiB) and the weights "
        "(27.7 MiB) need 97.7 GiB (104886636032 bytes) on each device, more than the 64.0 MiB (67108864 bytes) it "
        "has; lower max_slots (at most 36 fit with max_seq_len=256) or max_seq_len"), refused.value
    # generate and bench: the cache of their prompts, and the weights
    prompts = [a for _ in range(300) for a in ("--prompt-ids", "1,2,3")]
    assert main_error("generate", *prompts, "--max-new-tokens", "50", "--no-compile-cache").startswith(
        "gptjax generate: error: 300 prompts x at least 66 positions: the KV cache (77.3 MiB) and the weights")
    assert "error: -b 1000 (-i 100, -o 100) x at least 228 positions: the KV cache" in main_error(
        "bench", "--shapes", "1,4,2", "1000,100,100", "--no-compile-cache")
    assert "error: the model's weights need 474.7 MiB (497759232 bytes) on each device (float32, mesh " in main_error(
        "generate", "--model", "gpt2-124m", "--prompt", "x", "--no-compile-cache")


def test_convert_keeps_the_folders_own_tokenizer(hf_dir, tmp_path):
    """A local Hugging Face folder with its own vocab.json and merges.txt converted without them, and the model
    then ran on GPT-2's tokenizer without a word; they come along now, as a Hub conversion keeps them. A pair that
    can't be read is refused and leaves no folder."""
    import shutil

    from gptjax.engine import Engine
    from gptjax.tokenizer import Tokenizer, default_files

    src = tmp_path / "with-tokenizer"
    shutil.copytree(hf_dir, src)
    vocab, merges = default_files()
    shutil.copyfile(vocab, src / "vocab.json")
    lines = merges.read_text(encoding="utf-8").splitlines()
    (src / "merges.txt").write_text("\n".join(lines[:5001]) + "\n", encoding="utf-8")  # fewer merges: other ids
    dst = tmp_path / "ckpt"
    assert cli.main(["convert", "hf-gpt2", str(src), str(dst)]) == 0
    text = "Tokenizers disagree about uncommonly hyphenated-words"
    own = Tokenizer(src / "vocab.json", src / "merges.txt").encode(text)
    assert own != Tokenizer().encode(text)
    assert Engine.load(dst).tokenizer.encode(text) == own
    (src / "vocab.json").write_text('{"broken": ', encoding="utf-8")
    refused = tmp_path / "refused"
    assert cli.main(["convert", "hf-gpt2", str(src), str(refused)]) == 2
    assert not refused.exists()


@pytest.mark.parametrize("host, words", [("", "--host '' is empty"),
                                         ("192.0.2.1", "--host '192.0.2.1' is not an address of this machine"),
                                         ("[::1]", "an IPv6 address goes without brackets")])
def test_a_host_that_can_not_be_listened_on_exits_2_with_one_line_naming_the_flag(host, words):
    """With --port 0 gRPC was given the host unchecked, and it logged a line of its own ("E... add_port.cc] Failed
    to add port to server") before gptjax's. (A subprocess: gRPC writes that line to the process's stderr.)"""
    proc = run_cli("serve", "--host", host, "--port", "0", "--http-port", "0", "--metrics-port", "0", check=False,
                   env={"JAX_PLATFORMS": "cpu"}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptjax serve: error: ") and words in lines[0], lines


def test_an_ipv6_host_is_served_on_grpc():
    """gRPC read "::1:0" as the address ::0.1.0.0 at port 443: an IPv6 host goes to it in brackets."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    proc = subprocess.Popen([sys.executable, "-m", "gptjax", "serve", "--host", "::1", "--port", "0", "--http-port",
                             "0", "--metrics-port", "0"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        first = proc.stderr.readline()  # the model loads after this line
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=120)[1]
    assert "listening on gRPC [::1]:" in first, first + rest
