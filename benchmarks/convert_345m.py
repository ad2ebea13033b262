"""Time `gptjax convert megatron` on a random checkpoint of Megatron's 345M GPT shape and report its peak memory.

    python benchmarks/convert_345m.py [--tp 1] [--keep DIR]

Writes 24 layers, hidden 1024, 16 heads, padded vocabulary 50304, fp16 (about 700 MB) to a temporary folder,
then runs the converter as a child process and reports wall time and the child's peak resident memory. Both
steps run in child processes: Linux carries a parent's peak memory into a child's ru_maxrss across fork/exec,
so the parent stays small.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYERS, HIDDEN, HEADS, VOCAB, POSITIONS = 24, 1024, 16, 50304, 1024


def write_checkpoint(root: Path, tp: int) -> int:
    """A Megatron-LM checkpoint (version 3, with args) of random fp16 weights; returns its size in bytes."""
    import torch

    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    c, f = HIDDEN, 4 * HIDDEN
    args = argparse.Namespace(num_layers=LAYERS, hidden_size=c, num_attention_heads=HEADS, ffn_hidden_size=f,
                              max_position_embeddings=POSITIONS, padded_vocab_size=VOCAB,
                              tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, layernorm_epsilon=1e-5,
                              tokenizer_type="GPT2BPETokenizer", fp16=True, params_dtype=torch.float16)
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    size = 0
    for r in range(tp):
        enc = {}
        for i in range(LAYERS):
            q = f"layers.{i}."
            enc.update({q + "input_layernorm.weight": torch.ones(c).half(), q + "input_layernorm.bias": rand(c),
                        q + "self_attention.query_key_value.weight": rand(3 * c // tp, c),
                        q + "self_attention.query_key_value.bias": rand(3 * c // tp),
                        q + "self_attention.dense.weight": rand(c, c // tp), q + "self_attention.dense.bias": rand(c),
                        q + "post_attention_layernorm.weight": torch.ones(c).half(),
                        q + "post_attention_layernorm.bias": rand(c),
                        q + "mlp.dense_h_to_4h.weight": rand(f // tp, c), q + "mlp.dense_h_to_4h.bias": rand(f // tp),
                        q + "mlp.dense_4h_to_h.weight": rand(c, f // tp), q + "mlp.dense_4h_to_h.bias": rand(c)})
        enc["final_layernorm.weight"], enc["final_layernorm.bias"] = torch.ones(c).half(), rand(c)
        lm = {"embedding": {"word_embeddings": {"weight": rand(VOCAB // tp, c)},
                            "position_embeddings": {"weight": rand(POSITIONS, c)}}, "encoder": enc}
        path = root / "release" / f"mp_rank_{r:02d}" / "model_optim_rng.pt"
        path.parent.mkdir(parents=True)
        torch.save({"model": {"language_model": lm}, "args": args, "checkpoint_version": 3.0, "iteration": 0}, path)
        size += path.stat().st_size
    return size


_CONVERT = ("import resource, sys\n"
            "from gptjax.cli import main\n"
            "code = main(sys.argv[1:])\n"
            "print('peak_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
            "sys.exit(code)\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel parts to write")
    p.add_argument("--keep", metavar="DIR", help="work in DIR instead of a temporary folder")
    p.add_argument("--write-only", metavar="DIR", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.write_only:
        print(write_checkpoint(Path(a.write_only), a.tp))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.keep or tmp)
        src, dst = work / "megatron-345m", work / "converted"
        src.mkdir(parents=True)
        t0 = time.perf_counter()
        size = int(subprocess.run([sys.executable, __file__, "--tp", str(a.tp), "--write-only", str(src)],
                                  check=True, capture_output=True, text=True).stdout)
        write_s = time.perf_counter() - t0
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CONVERT, "convert", "megatron", str(src), str(dst)], env=env,
                              capture_output=True, text=True)
        convert_s = time.perf_counter() - t0
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        peak = int(proc.stderr.split("peak_kib")[-1].split()[0]) * 1024  # Linux reports KiB
        out_bytes = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
        print(json.dumps({"checkpoint_mb": round(size / 2**20), "tp": a.tp, "write_s": round(write_s, 1),
                          "convert_s": round(convert_s, 1), "peak_rss_mb": round(peak / 2**20),
                          "peak_over_checkpoint": round(peak / size, 2), "output_mb": round(out_bytes / 2**20)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
