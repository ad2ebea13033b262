"""The `gptjax` command as users run it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import hf_greedy, run_cli
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
    cases = [
        ["generate", "--prompt-ids", "1,2,99999999"],
        ["generate", "--prompt", "x", "--max-new-tokens", "0"],
        ["generate", "--prompt", "x", "--top-p", "1.5"],
        ["generate", "--prompt", "x", "--mesh", "tensor=3"],
        ["generate", "--prompt", "x", "--checkpoint", str(tmp_path)],
        ["convert", "hf-gpt2", str(tmp_path / "missing"), str(tmp_path / "out")],
    ]
    for args in cases:
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and "error" in lines[0], (args, proc.stderr)
    proc = run_cli("generate", "--prompt-ids", "1,x", check=False)  # argparse's own usage errors
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
