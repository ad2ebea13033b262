"""Plot `gptjax bench --json` rows: latency and tokens/s against batch, per model and implementation; or, with
--serving, the serving benchmark's rows (`--request-rate`): latency against throughput, per model.

    python benchmarks/plot.py benchmarks/bench.png out/bench.jsonl [more.jsonl ...]
    python benchmarks/plot.py --serving benchmarks/serving.png out/serving.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODEL_NAMES = {354_823_168: "megatron-345m", 6_658_404_352: "gpt3-6.7b"}


def model_name(row) -> str:
    params = row["extra"].get("model_params", 0)
    return MODEL_NAMES.get(params, f"{params / 1e9:.1f}B params") + f" ({row['extra']['dtype']})"


def _median_row(rows: list[dict]) -> dict:
    """One point per batch: the row of median latency where a run measured a shape more than once."""
    return sorted(rows, key=lambda r: r["latency_ms"])[len(rows) // 2]


def read_rows(sources) -> list[dict]:
    rows = [json.loads(line) for src in sources for line in open(src) if line.strip().startswith("{")]
    return [r for r in rows if "not_plotted" not in r.get("extra", {})]  # the row says why (superseded, invalid)


def serving_label(row) -> str:
    extra = row["extra"]
    return f"{extra['model']} ({extra['dtype']}, {extra['max_slots']} slots)"


def plot_serving(dst: str, rows: list[dict]) -> None:
    """TTFT and TPOT (p50 solid, p99 dashed) against output tokens/s, one line per model and length setting:
    each point a request rate, left to right as the rate rises, the last ones where the server saturates."""
    rows = [r for r in rows if "request_rate" in r]
    groups = defaultdict(list)
    for r in rows:
        groups[(serving_label(r), r["input_len_dist"], r["output_len_dist"])].append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    for (label, inputs, outputs), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["output_tokens_per_s"])
        x = [r["output_tokens_per_s"] for r in rs]
        for ax, metric in zip(axes[0], ("ttft_ms", "tpot_ms")):
            line, = ax.plot(x, [r[metric]["p50"] for r in rs], "o-", label=f"{label}, in {inputs}, out {outputs}: p50")
            ax.plot(x, [r[metric]["p99"] for r in rs], "s--", color=line.get_color(), label="p99")
    for ax, name in zip(axes[0], ("time to first token, ms", "time per output token, ms")):
        # log x: models a few times apart in throughput share the axes
        _log_axes(ax, "output tokens / s (each point a request rate)", name, f"{name.split(',')[0]} against throughput",
                  base=10, legend_size=7)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


def _log_axes(ax, xlabel: str, ylabel: str, title: str, base: int, legend_size: int) -> None:
    ax.set_xscale("log", base=base)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


def main(dst: str, *sources: str) -> None:
    if dst == "--serving":
        plot_serving(sources[0], read_rows(sources[1:]))
        return
    rows = [r for r in read_rows(sources) if "batch" in r]
    models = sorted({model_name(r) for r in rows})
    devices = " / ".join(sorted({r["device"] for r in rows if r["impl"].startswith("gptjax")}))
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.2 * len(models)), squeeze=False)
    for m, model in enumerate(models):
        groups = defaultdict(list)
        for r in rows:
            if model_name(r) == model and r["input_len"] == 128 and r["output_len"] == 128:
                groups[r["impl"]].append(r)
        floors = {}
        for impl, rs in sorted(groups.items()):
            rs = [_median_row([r for r in rs if r["batch"] == b]) for b in sorted({r["batch"] for r in rs})]
            batches = [r["batch"] for r in rs]
            axes[m][0].plot(batches, [r["latency_ms"] for r in rs], "o-", label=impl)
            axes[m][1].plot(batches, [r["tokens_per_s"] for r in rs], "o-", label=impl)
            floors.update({r["batch"]: r["floor_ms"] for r in rs})
        if floors:
            fb = sorted(floors)
            axes[m][0].plot(fb, [floors[b] for b in fb], "k--", label="hardware floor")
            axes[m][1].plot(fb, [b * 128 / floors[b] * 1e3 for b in fb], "k--", label="hardware floor")
        for ax, label in zip(axes[m], ("latency ms (128 in, 128 out)", "new tokens / s")):
            _log_axes(ax, "batch", label, f"{model}, {devices}", base=2, legend_size=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
