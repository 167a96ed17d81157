"""PNG figures of the benches' JSON results (matplotlib, headless).

Each ``plot_*(result, path)`` reads the dict that the bench's ``run`` returns (and writes as JSON),
so a figure can be redrawn from a saved file: ``plot_latency(json.load(f), "out.png")``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _subtitle(result: dict[str, Any]) -> str:
    env = result.get("env") or {}
    where = env.get("gpu") or env.get("cpu") or result.get("device") or "cpu"
    return f"{result.get('model') or ''} | {where} | commit {env.get('commit') or '?'}"


def _save(fig: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    _pyplot().close(fig)
    return p


def plot_latency(result: dict[str, Any], path: str | Path) -> Path:
    """Per-token latency (median, p90-p99 band) and TTFT vs batch size, one line per
    (input, output) length; the transformers baseline dashed when present."""
    plt = _pyplot()
    fig, (ax_tok, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for r in result["results"]:
        groups[(r["input_len"], r["output_len"])].append(r)
    for (inp, out), rows in sorted(groups.items()):
        rows.sort(key=lambda r: r["batch_size"])
        xs = [r["batch_size"] for r in rows]
        tok = [r["per_token_ms"] for r in rows]
        line, = ax_tok.plot(xs, [t["median"] for t in tok], "o-",
                            label=f"fuselm in={inp} out={out}")
        ax_tok.fill_between(xs, [t["p90"] for t in tok], [t["p99"] for t in tok],
                            color=line.get_color(), alpha=0.2)
        ax_ttft.plot(xs, [r["ttft_ms"]["median"] for r in rows], "o-", color=line.get_color(),
                     label=f"fuselm in={inp}")
        if all("hf" in r for r in rows):
            ax_tok.plot(xs, [r["hf"]["per_token_ms"]["median"] for r in rows], "s--",
                        color=line.get_color(), label=f"transformers in={inp} out={out}")
            ax_ttft.plot(xs, [r["hf"]["ttft_ms"]["median"] for r in rows], "s--",
                         color=line.get_color(), label=f"transformers in={inp}")
    ax_tok.set(xlabel="batch size", ylabel="per-token latency (ms), band p90-p99",
               title="decode latency")
    ax_ttft.set(xlabel="batch size", ylabel="time to first token (ms)", title="TTFT")
    batch_sizes = sorted({r["batch_size"] for r in result["results"]})
    for ax in (ax_tok, ax_ttft):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(_subtitle(result), fontsize=8)
    return _save(fig, path)


def _hist(ax: Any, values_ms: list[float], title: str, xlabel: str) -> None:
    if values_ms:
        ax.hist(values_ms, bins=min(50, max(5, len(values_ms) // 2)), alpha=0.8)
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.grid(alpha=0.3)


def plot_throughput(result: dict[str, Any], path: str | Path) -> Path:
    """Distributions of per-request TTFT and end-to-end latency of an offline throughput run."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    req = result.get("requests") or {}
    _hist(a, [x * 1e3 for x in req.get("ttft_s", [])], "time to first token", "ms")
    _hist(b, [x * 1e3 for x in req.get("e2e_s", [])], "end-to-end latency", "ms")
    fig.suptitle(f"{result['num_prompts']} requests: {result['requests_per_s']:.2f} req/s, "
                 f"{result['output_tokens_per_s']:.1f} output tok/s\n{_subtitle(result)}",
                 fontsize=8)
    return _save(fig, path)


def plot_serving(result: dict[str, Any], path: str | Path) -> Path:
    """Throughput and TTFT vs request rate (one point per rate run), and the TTFT and ITL
    distributions of the highest-rate run."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    runs = result["runs"]
    xs = [r["request_rate"] if r["request_rate"] is not None else float("nan") for r in runs]
    finite = [x for x in xs if x == x and x != float("inf")]
    cap = (max(finite) * 2 if finite else 1.0)
    xs = [cap if (x != x or x == float("inf")) else x for x in xs]  # inf rate drawn at 2x max
    ax = axes[0][0]
    ax.plot(xs, [r["output_throughput"] for r in runs], "o-", label="output tok/s")
    ax.plot(xs, [r["request_throughput"] * 100 for r in runs], "s--", label="requests/s x100")
    if any(r.get("goodput") is not None for r in runs):
        ax.plot(xs, [(r.get("goodput") or 0) * 100 for r in runs], "^:", label="goodput x100")
    ax.set(xlabel="request rate (req/s; inf drawn at 2x max)", title="throughput")
    ax = axes[0][1]
    for key, style in (("ttft_ms", "o-"), ("tpot_ms", "s--"), ("itl_ms", "^:")):
        ax.plot(xs, [r[key]["median"] for r in runs], style, label=f"{key[:-3]} median")
        ax.plot(xs, [r[key]["p99"] for r in runs], style, alpha=0.4, label=f"{key[:-3]} p99")
    ax.set(xlabel="request rate (req/s)", ylabel="ms", title="latency vs load")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    last = runs[-1]
    _hist(axes[1][0], last.get("ttft_samples_ms", []), "TTFT distribution (last run)", "ms")
    _hist(axes[1][1], last.get("itl_samples_ms", []), "ITL distribution (last run)", "ms")
    fig.suptitle(_subtitle(result), fontsize=8)
    return _save(fig, path)
