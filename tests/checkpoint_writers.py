"""Write a Hugging Face GPT-2 out as the files other tools produce: Megatron-LM parts, FasterTransformer c-models.

These are independent of the readers in `checkpoints/`: they follow the layouts that Megatron-LM and
FasterTransformer write, so a reader bug shows as wrong tokens.
"""

from __future__ import annotations

import argparse
import configparser
from pathlib import Path

import numpy as np
import torch

GPT2_VOCAB = 50257


def padded_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary to a multiple of divisible_by * tensor-parallel size."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def _hf_weights(model):
    """GPT-2's tensors as float32 numpy, with Linear-style [out, in] weights (HF's Conv1D is [in, out])."""
    sd = {k.removeprefix("transformer."): v.detach().float().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    return sd, cfg.n_layer, cfg.n_embd, cfg.n_head


def _qkv_rows(x, heads_slice, n_heads, version):
    """QKV of one tensor-parallel rank in Megatron's row order for `version`.

    x: [3 * hidden, ...] rows ordered (q|k|v, head, head_dim), HF's order. Version 0 keeps (3, heads, dim)
    per rank, version 1 is (heads, dim, 3), versions 2 and 3 are (heads, 3, dim).
    """
    rest = x.shape[1:]
    d = x.shape[0] // 3 // n_heads
    t = x.reshape(3, n_heads, d, *rest)[:, heads_slice]
    if version == 0:
        out = t
    elif version == 1:
        out = np.moveaxis(t, 0, 2)  # [h, d, 3]
    else:
        out = np.swapaxes(t, 0, 1)  # [h, 3, d]
    return np.ascontiguousarray(out).reshape(-1, *rest)


def write_megatron(model, root: Path, *, tp: int = 1, pp: int = 1, version: float = 3.0, with_args: bool = True,
                   vocab_padded: int | None = None, new_names: bool = True, file_name: str = "model_optim_rng.pt",
                   iteration: int | str = "release", dtype=torch.float32, seed: int = 0,
                   args: dict | None = None) -> Path:
    """`root/latest_checkpointed_iteration.txt` and `root/<release|iter_N>/mp_rank_XX[_YYY]/<file_name>`; `args`
    adds fields to the saved args.

    The padding rows of the word embeddings get random values, as Megatron's are; a reader that keeps them
    would change the greedy tokens.
    """
    sd, n_layer, c, n_head = _hf_weights(model)
    f = sd["h.0.mlp.c_fc.weight"].shape[1]
    vocab = sd["wte.weight"].shape[0]
    vp = vocab_padded or padded_vocab(vocab, tp)
    rng = np.random.default_rng(seed)
    wte = np.concatenate([sd["wte.weight"], rng.normal(0, 1.0, (vp - vocab, c)).astype(np.float32)])
    attn = "self_attention" if new_names else "attention"
    stack = "encoder" if new_names else "transformer"
    per_stage = n_layer // pp
    hl, fl, vl = n_head // tp, f // tp, vp // tp
    d = c // n_head

    folder = root / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))

    def t(x):
        return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)

    for r in range(tp):
        heads = slice(r * hl, (r + 1) * hl)
        cols = slice(r * hl * d, (r + 1) * hl * d)
        for s in range(pp):
            enc = {}
            for local in range(per_stage):
                i = s * per_stage + local
                p, q = f"h.{i}.", f"layers.{local}."
                enc[q + "input_layernorm.weight"] = t(sd[p + "ln_1.weight"])
                enc[q + "input_layernorm.bias"] = t(sd[p + "ln_1.bias"])
                enc[q + f"{attn}.query_key_value.weight"] = t(
                    _qkv_rows(sd[p + "attn.c_attn.weight"].T, heads, n_head, version))
                enc[q + f"{attn}.query_key_value.bias"] = t(
                    _qkv_rows(sd[p + "attn.c_attn.bias"], heads, n_head, version))
                enc[q + f"{attn}.dense.weight"] = t(sd[p + "attn.c_proj.weight"].T[:, cols])
                enc[q + f"{attn}.dense.bias"] = t(sd[p + "attn.c_proj.bias"])
                enc[q + "post_attention_layernorm.weight"] = t(sd[p + "ln_2.weight"])
                enc[q + "post_attention_layernorm.bias"] = t(sd[p + "ln_2.bias"])
                enc[q + "mlp.dense_h_to_4h.weight"] = t(sd[p + "mlp.c_fc.weight"].T[r * fl:(r + 1) * fl])
                enc[q + "mlp.dense_h_to_4h.bias"] = t(sd[p + "mlp.c_fc.bias"][r * fl:(r + 1) * fl])
                enc[q + "mlp.dense_4h_to_h.weight"] = t(sd[p + "mlp.c_proj.weight"].T[:, r * fl:(r + 1) * fl])
                enc[q + "mlp.dense_4h_to_h.bias"] = t(sd[p + "mlp.c_proj.bias"])
            lm = {}
            word = {"weight": t(wte[r * vl:(r + 1) * vl])}
            if s == 0:
                lm["embedding"] = {"word_embeddings": word, "position_embeddings": {"weight": t(sd["wpe.weight"])}}
            if s == pp - 1:
                enc["final_layernorm.weight"] = t(sd["ln_f.weight"])
                enc["final_layernorm.bias"] = t(sd["ln_f.bias"])
            lm[stack] = enc
            state = {"model": {"language_model": lm}, "iteration": 0}
            if s == pp - 1 and pp > 1:
                state["model"]["word_embeddings_for_head"] = {"weight": t(wte[r * vl:(r + 1) * vl])}
            if version:
                state["checkpoint_version"] = version
            if with_args:
                state["args"] = argparse.Namespace(
                    num_layers=n_layer, hidden_size=c, num_attention_heads=n_head, ffn_hidden_size=f,
                    max_position_embeddings=sd["wpe.weight"].shape[0], padded_vocab_size=vp,
                    tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, layernorm_epsilon=1e-5,
                    tokenizer_type="GPT2BPETokenizer", fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16,
                    params_dtype=dtype, make_vocab_size_divisible_by=128, seq_length=64, **(args or {}))
            name = f"mp_rank_{r:02d}" if pp == 1 else f"mp_rank_{r:02d}_{s:03d}"
            (folder / name).mkdir(parents=True, exist_ok=True)
            torch.save(state, folder / name / file_name)
    return root


def write_ft(model, out: Path, *, tp: int = 2, weight_data_type: str = "fp32", vocab_padded: int | None = None,
             seed: int = 0) -> Path:
    """A FasterTransformer "c-model" folder as FT's megatron_ckpt_convert.py writes it (`out/<tp>-gpu/`).

    Weights are stored transposed ([in, out]); QKV as [hidden, 3, local_hidden] per rank, its bias as
    [3, local_hidden]; row-parallel weights split along their first axis, column-parallel along the last.
    """
    sd, n_layer, c, n_head = _hf_weights(model)
    dt = {"fp32": np.float32, "fp16": np.float16}[weight_data_type]
    f = sd["h.0.mlp.c_fc.weight"].shape[1]
    vocab = sd["wte.weight"].shape[0]
    vp = vocab_padded or padded_vocab(vocab, tp)
    rng = np.random.default_rng(seed)
    wte = np.concatenate([sd["wte.weight"], rng.normal(0, 1.0, (vp - vocab, c)).astype(np.float32)])
    folder = out / f"{tp}-gpu"
    folder.mkdir(parents=True)

    def save(name, x):
        np.ascontiguousarray(x).astype(dt).tofile(folder / f"model.{name}.bin")

    save("wte", wte)
    save("wpe", sd["wpe.weight"])
    save("final_layernorm.weight", sd["ln_f.weight"])
    save("final_layernorm.bias", sd["ln_f.bias"])
    for i in range(n_layer):
        p, q = f"h.{i}.", f"layers.{i}."
        save(q + "input_layernorm.weight", sd[p + "ln_1.weight"])
        save(q + "input_layernorm.bias", sd[p + "ln_1.bias"])
        save(q + "attention.dense.bias", sd[p + "attn.c_proj.bias"])
        save(q + "post_attention_layernorm.weight", sd[p + "ln_2.weight"])
        save(q + "post_attention_layernorm.bias", sd[p + "ln_2.bias"])
        save(q + "mlp.dense_4h_to_h.bias", sd[p + "mlp.c_proj.bias"])
        qkv_w = sd[p + "attn.c_attn.weight"].reshape(c, 3, c)  # [in, (q|k|v, hidden)]
        qkv_b = sd[p + "attn.c_attn.bias"].reshape(3, c)
        for r, cols in enumerate(np.split(np.arange(c), tp)):
            save(q + f"attention.query_key_value.weight.{r}", qkv_w[:, :, cols])
            save(q + f"attention.query_key_value.bias.{r}", qkv_b[:, cols])
        for r, part in enumerate(np.split(sd[p + "attn.c_proj.weight"], tp, axis=0)):
            save(q + f"attention.dense.weight.{r}", part)
        for r, part in enumerate(np.split(sd[p + "mlp.c_fc.weight"], tp, axis=1)):
            save(q + f"mlp.dense_h_to_4h.weight.{r}", part)
        for r, part in enumerate(np.split(sd[p + "mlp.c_fc.bias"], tp)):
            save(q + f"mlp.dense_h_to_4h.bias.{r}", part)
        for r, part in enumerate(np.split(sd[p + "mlp.c_proj.weight"], tp, axis=0)):
            save(q + f"mlp.dense_4h_to_h.weight.{r}", part)
    config = configparser.ConfigParser()
    config["gpt"] = {"model_name": "gpt", "head_num": str(n_head), "size_per_head": str(c // n_head),
                     "inter_size": str(f), "num_layer": str(n_layer), "max_pos_seq_len": str(sd["wpe.weight"].shape[0]),
                     "vocab_size": str(vp), "has_adapters": "False", "adapter_inter_size": "0",
                     "layernorm_eps": "1e-05", "start_id": "50256", "end_id": "50256",
                     "weight_data_type": weight_data_type, "tensor_para_size": str(tp)}
    with open(folder / "config.ini", "w") as fh:
        config.write(fh)
    return folder


def convert_failure(capsys, tmp_path, fmt: str, src, *flags) -> str:
    """Run `gptjax convert FMT SRC tmp/out` in-process, expecting exit 2 with one error line and nothing
    left behind in tmp_path; returns that line."""
    from gptjax import cli

    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    code = cli.main(["convert", fmt, str(src), str(out), *flags])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("gptjax convert: error: "), err
    assert not out.exists() and set(tmp_path.iterdir()) == before
    return lines[0]
