"""Hugging Face Hub ids as models: fetched through huggingface_hub, converted once, listed and removed.

No network: the tests write repos into a temporary Hub cache (`models--ORG--NAME/snapshots/<commit>/`,
`refs/main`) and run with HF_HUB_OFFLINE=1, as a machine that downloaded them before would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from checkpoints.hf_gpt2 import write_tokenizer_files
from conftest import hf_greedy, run_cli
from gptjax import cli, hub
from gptjax.checkpoint import CheckpointError
from gptjax.engine import Engine
from gptjax.tokenizer import Tokenizer, default_files

COMMIT = "3f1c0e5a9b2d4c6e8f0a1b3c5d7e9f1a2b4c6d8e"
PROMPTS = [[464, 2068, 7586, 21831, 18045], [15496, 995, 11, 314]]
N_NEW = 6
TEXT = "Hello world, the quick brown fox jumps over the lazy dog: antidisestablishmentarianism in 1999!"


def write_repo(cache: Path, repo: str, commit: str = COMMIT) -> Path:
    """An empty snapshot of `repo` that `main` points at; returns the snapshot folder."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return snapshot


def write_bpe_files(folder: Path) -> Path:
    """vocab.json and merges.txt of GPT-2 with only its first 10000 merges, so that this tokenizer differs from
    the default one."""
    vocab, merges = default_files()
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vocab, folder / "vocab.json")
    lines = merges.read_text(encoding="utf-8").splitlines()
    (folder / "merges.txt").write_text("\n".join(lines[:10001]) + "\n", encoding="utf-8")
    return folder


def write_tokenizer(snapshot: Path, work: Path) -> None:
    """That tokenizer as transformers 5 saves one: tokenizer.json alone."""
    from transformers import GPT2TokenizerFast

    GPT2TokenizerFast.from_pretrained(write_bpe_files(work)).save_pretrained(snapshot)
    assert not (snapshot / "vocab.json").exists()


@pytest.fixture(scope="module")
def hub_cache(hf_model, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf-hub")
    good = write_repo(cache, "org/name")
    hf_model.save_pretrained(good)
    write_tokenizer(good, cache.parent / "bpe-files")
    llama = write_repo(cache, "org/llama")
    (llama / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    broken = write_repo(cache, "org/broken")
    shutil.copyfile(good / "config.json", broken / "config.json")
    data = (good / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    return cache


def use_caches(mp: pytest.MonkeyPatch, hub_cache: Path, gptjax_cache: Path) -> None:
    """Offline, on these caches: here (huggingface_hub read its settings on import) and in child processes."""
    from huggingface_hub import constants

    mp.setenv("HF_HUB_CACHE", str(hub_cache))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("GPTJAX_CACHE_DIR", str(gptjax_cache))
    mp.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    mp.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def fresh(hub_cache, tmp_path, monkeypatch) -> Path:
    """An empty gptjax cache; returns it."""
    use_caches(monkeypatch, hub_cache, tmp_path / "gptjax")
    return tmp_path / "gptjax"


@pytest.fixture(scope="module")
def converted(hub_cache, tmp_path_factory):
    """org/name converted in this process; the caches stay set for the module's tests that use it."""
    with pytest.MonkeyPatch.context() as mp:
        use_caches(mp, hub_cache, tmp_path_factory.mktemp("gptjax-cache"))
        yield hub.pretrained_folder("org/name")


@pytest.fixture(scope="module")
def expected(hf_model):
    return [hf_greedy(hf_model, p, N_NEW) for p in PROMPTS]


def greedy_args(model: str) -> list[str]:
    args = ["generate", "--model", model, "--greedy", "--no-stop", "--json", "--max-new-tokens", str(N_NEW)]
    for p in PROMPTS:
        args += ["--prompt-ids", ",".join(map(str, p))]
    return args


def test_generate_from_a_hub_id_converts_once(fresh, expected):
    first = run_cli(*greedy_args("org/name"))
    assert [json.loads(line)["output_ids"] for line in first.stdout.splitlines()] == expected
    folder = hub.converted_folder("org/name", COMMIT)
    assert f"converted org/name@{COMMIT[:12]} into {folder}" in first.stderr
    stamps = {p: p.stat().st_mtime_ns for p in [folder, *folder.rglob("*")]}
    second = run_cli(*greedy_args("org/name"))
    assert second.stdout == first.stdout
    assert "converted" not in second.stderr
    assert {p: p.stat().st_mtime_ns for p in [folder, *folder.rglob("*")]} == stamps


def test_from_pretrained_gives_hugging_face_tokens(converted, expected):
    engine = Engine.from_pretrained("org/name")
    results = engine.generate(PROMPTS, max_new_tokens=N_NEW, greedy=True, stop_token_ids=[])
    assert [r.output_ids for r in results] == expected
    assert converted == hub.converted_folder("org/name", COMMIT)
    assert hub.pretrained_folder(f"org/name@{COMMIT}") == converted  # a pinned commit: the same folder


def test_the_repo_tokenizer_files_come_along(converted, hub_cache):
    from transformers import GPT2TokenizerFast

    repo_tokenizer = GPT2TokenizerFast.from_pretrained(hub_cache / "models--org--name" / "snapshots" / COMMIT)
    ours = Tokenizer(converted / "vocab.json", converted / "merges.txt")
    assert ours.encode(TEXT) == repo_tokenizer(TEXT)["input_ids"]
    assert ours.encode(TEXT) != Tokenizer().encode(TEXT)  # the repo's merges, not the default ones


def test_a_loaded_folder_speaks_with_its_own_tokenizer(converted):
    engine = Engine.load(converted)
    assert engine.tokenizer.encode(TEXT) == Tokenizer(converted / "vocab.json", converted / "merges.txt").encode(TEXT)
    assert engine.tokenizer.encode(TEXT) != Tokenizer().encode(TEXT)
    assert engine.engine_config.eos_token_id == 50256  # where this vocabulary has <|endoftext|>


def test_the_end_token_follows_a_vocabulary_that_moves_it(tmp_path):
    from gptjax.config import EngineConfig

    folder = write_bpe_files(tmp_path / "moved")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    moved = next(token for token, i in vocab.items() if i == 7)
    vocab[moved], vocab["<|endoftext|>"] = 50256, 7
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = Tokenizer(folder / "vocab.json", folder / "merges.txt")
    assert EngineConfig().ending_at(tokenizer).eos_token_id == 7
    assert EngineConfig(eos_token_id=99).ending_at(tokenizer).eos_token_id == 99  # a configured end_id stays
    assert EngineConfig().ending_at(None).eos_token_id == 50256


def test_vocab_and_merges_files_are_copied_as_they_are(tmp_path):
    src = write_bpe_files(tmp_path / "repo")
    (tmp_path / "out").mkdir()
    write_tokenizer_files(src, tmp_path / "out")
    for name in hub.FOLDER_FILES:
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()


def test_a_tokenizer_other_than_byte_level_bpe_is_refused(tmp_path):
    spec = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "BertPreTokenizer"}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="its tokenizer .WordPiece model, BertPreTokenizer"):
        write_tokenizer_files(tmp_path, tmp_path)


def test_a_conversion_outlives_the_hub_cache(converted, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "emptied"))
    assert hub.pretrained_folder("org/name") == converted
    assert hub.pretrained_folder("org/name@" + COMMIT) == converted
    with pytest.raises(hub.ModelNotFound, match="org/name@v2 is not in the Hugging Face cache and HF_HUB_OFFLINE"):
        hub.pretrained_folder("org/name", revision="v2")


def cli_fails(capsys, args) -> str:
    code = cli.main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("model, words", [
    ("org/missing", ["not a preset (gpt2-tiny", "org/missing is not in the Hugging Face cache", "HF_HUB_OFFLINE"]),
    ("not an id!", ["not a preset", "is not a Hugging Face Hub id"]),
    ("org/llama", ["org/llama@3f1c0e5a9b2d", "LlamaForCausalLM is not supported", "GPT2LMHeadModel"]),
    ("org/broken", ["org/broken@3f1c0e5a9b2d", "model.safetensors: cannot read weights",
                    "delete it from the Hugging Face cache"]),
], ids=["unknown", "bad-id", "llama", "truncated"])
def test_failures_exit_2_with_one_line_and_leave_nothing(fresh, capsys, model, words):
    line = cli_fails(capsys, ["generate", "--model", model, "--prompt", "x"])
    assert line.startswith("gptjax generate: error: ")
    for w in words:
        assert w in line
    assert hub.converted_models() == [] and not [p for p in fresh.rglob("*@*") if not p.name.endswith(".lock")]


def test_a_repo_of_another_tokenizer_is_not_blamed_on_the_download_from_the_command_line(fresh, capsys, hub_cache,
                                                                                       hf_model):
    """The command line converts in a child process: its refusal came back as text, with the advice to delete the
    download as damaged."""
    snapshot = write_repo(hub_cache, "org/wordpiece-cli")
    hf_model.save_pretrained(snapshot)
    spec = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "BertPreTokenizer"}}
    (snapshot / "tokenizer.json").write_text(json.dumps(spec))
    capsys.readouterr()  # the saving's progress bar
    line = cli_fails(capsys, ["generate", "--model", "org/wordpiece-cli", "--prompt", "x"])
    assert "its tokenizer (WordPiece model" in line and "damaged" not in line, line
    assert hub.converted_models() == []


def test_models_lists_and_removes(fresh, capsys, hf_model):
    folder = hub.pretrained_folder("org/name")
    assert cli.main(["models"]) == 0
    rows = capsys.readouterr().out.splitlines()
    row = next(r.split() for r in rows if r.startswith("org/name@"))
    params = f"{hf_model.num_parameters() / 1e6:.1f}M"
    assert row[:4] == [f"org/name@{COMMIT[:12]}", "hub", "main", params] and row[5] in ("KiB", "MiB")
    assert any(r.split()[:2] == ["gpt2-tiny", "preset"] for r in rows)
    # a commit prefix shorter than 7 characters names no conversion (as for --model): one character took any
    assert "no converted model org/name@" in cli_fails(capsys, ["models", "--rm", f"org/name@{COMMIT[:6]}"])
    assert folder.exists()
    assert cli.main(["models", "--rm", f"org/name@{COMMIT[:8]}"]) == 0
    assert not folder.exists() and hub.converted_models() == []
    cli.main(["models"])
    assert "org/name" not in capsys.readouterr().out
    assert "no converted model org/name in" in cli_fails(capsys, ["models", "--rm", "org/name"])


def test_model_ids_and_revisions():
    assert hub.parse_model_id("gpt2") == ("gpt2", None)
    assert hub.parse_model_id("openai-community/gpt2-medium@v1.0") == ("openai-community/gpt2-medium", "v1.0")
    assert hub.parse_model_id("org/name", "abc") == ("org/name", "abc")
    with pytest.raises(hub.HubError, match="revision 'b' was given too"):
        hub.parse_model_id("org/name@a", "b")
    with pytest.raises(hub.ModelNotFound, match="not a Hugging Face Hub id"):
        hub.parse_model_id("a/b/c")


def test_sharded_weights_read_as_one_file(hf_model, tmp_path):
    from checkpoints.hf_gpt2 import read_tensors

    hf_model.save_pretrained(tmp_path, max_shard_size="2MB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    tensors = read_tensors(tmp_path)
    for name, value in hf_model.state_dict().items():
        if name != "lm_head.weight":  # tied to the embedding: saved once
            np.testing.assert_array_equal(tensors[name], value.numpy(), err_msg=name)


def test_the_name_models_lists_loads_offline(converted):
    """`gptjax models` shows a commit's first 12 characters; that name is a --model too."""
    assert hub.pretrained_folder(f"org/name@{COMMIT[:12]}") == converted


def test_a_folder_left_without_its_source_is_converted_again(fresh):
    """A conversion or removal cut short leaves the folder without source.json (written last, removed first): it
    is a leftover, not a model, and the next use converts into its place."""
    folder = hub.converted_folder("org/name", COMMIT)
    (folder / "params").mkdir(parents=True)
    assert hub.pretrained_folder("org/name") == folder and (folder / hub.SOURCE_FILE).is_file()
    hub.remove_converted("org/name")
    assert not folder.exists()


def bpe_spec(vocab, merges) -> dict:
    return {"model": {"type": "BPE", "vocab": vocab, "merges": merges}, "pre_tokenizer": {"type": "ByteLevel"}}


@pytest.mark.parametrize("text, words", [
    ("[" * 100_000, "tokenizer.json can't be read (RecursionError"),  # was a RecursionError traceback
    (json.dumps(bpe_spec({"a": 0}, [[1, 2]])), "merges that are not pairs of tokens without spaces"),  # TypeError
    (json.dumps(bpe_spec({"a": -1}, [])), "its tokenizer can't be read (Error while reading BPE files"),
    (json.dumps(bpe_spec({"a": 0}, ["x y"])), "its tokenizer can't be read (Error while initializing BPE: Token `x`"),
], ids=["nested", "merges-of-numbers", "negative-id", "unknown-merge"])
def test_a_tokenizer_json_that_can_not_be_read_is_refused(tmp_path, text, words):
    """The last two were written out, and every load of the folder then failed with tokenizers' bare Exception."""
    (tmp_path / "tokenizer.json").write_text(text)
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError) as e:
        write_tokenizer_files(tmp_path, tmp_path / "out")
    assert words in str(e.value)


def test_vocab_and_merges_that_can_not_be_read_are_refused_and_nothing_is_kept(fresh, hub_cache, hf_model):
    """They were copied as they were: the conversion was kept, and every load of it failed with a traceback."""
    snapshot = write_repo(hub_cache, "org/bad-vocab")
    hf_model.save_pretrained(snapshot)
    (snapshot / "vocab.json").write_text('{"a": 0, "b": ')  # cut short
    (snapshot / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(hub.HubError, match="org/bad-vocab@3f1c0e5a9b2d: its tokenizer can't be read"):
        hub.pretrained_folder("org/bad-vocab")
    assert hub.converted_models() == [] and not [p for p in fresh.rglob("*@*") if not p.name.endswith(".lock")]


def test_a_repo_of_another_tokenizer_is_refused_without_blaming_the_download(fresh, hub_cache, hf_model):
    """A whole download whose tokenizer is not GPT-2's kind was refused with the advice to delete it as damaged."""
    snapshot = write_repo(hub_cache, "org/wordpiece")
    hf_model.save_pretrained(snapshot)
    spec = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "pre_tokenizer": {"type": "BertPreTokenizer"}}
    (snapshot / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(hub.HubError, match=r"org/wordpiece@3f1c0e5a9b2d: its tokenizer \(WordPiece model") as e:
        hub.pretrained_folder("org/wordpiece")
    assert "damaged" not in str(e.value)
    assert hub.converted_models() == []


def test_a_source_json_that_is_not_ours_is_left_out_of_the_list(fresh, capsys):
    """A source.json nested too deeply was a RecursionError traceback of `gptjax models`."""
    folder = hub.converted_folder("org/name", COMMIT)
    folder.mkdir(parents=True)
    (folder / hub.SOURCE_FILE).write_text("[" * 100_000)
    assert hub.converted_models() == []
    assert cli.main(["models"]) == 0 and "org/name" not in capsys.readouterr().out
