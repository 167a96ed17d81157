"""``fuselm bench perplexity FILE``: teacher-forced perplexity of a text file through the engine.

The file (UTF-8; ``.gz`` read as gzip; ``shakespeare`` names the public-domain text shipped in
``fuselm/bench/data``) is tokenized once without special tokens and cut into windows of
``--window`` tokens; each window is one request with ``prompt_logprobs=0`` (and one generated
token, not scored), so every token after a window's first is scored given the tokens before
it in its window. Perplexity = exp(mean negative log-likelihood over the scored tokens).

The prompts run through the paged KV cache with chunked prefill: with
``--max-num-batched-tokens`` well below the window, most of each token's context is read back
from the cache (what decoding reads), so an FP8 KV cache's cost shows.

``--variants`` runs the same text through several engines built one after the other from the
same flags, each changed by one variant, and prints one table with each variant's change
against the first: ``base`` (the flags as given), ``fp8``, ``int8``, ``int4``, ``gguf`` (the
``--quantization`` of that name) and ``kv-fp8`` (``--kv-cache-dtype fp8``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import gzip
import math
import time
from importlib import resources
from pathlib import Path
from typing import Any

from fuselm.bench import report

NAME = "perplexity"
BUILTIN_TEXTS = {"shakespeare": "shakespeare.txt.gz"}
VARIANTS = ("base", "fp8", "fp8-gptq", "int8", "int4", "gguf", "kv-fp8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fuselm bench perplexity`` (engine flags come from ``fuselm.cli_args``)."""
    a = parser.add_argument
    a("file", help="UTF-8 text file (.gz allowed), or 'shakespeare' for the packaged text")
    a("--window", type=int, default=1024, help="tokens per scored window (one request each)")
    a("--max-scored-tokens", type=int, default=None,
      help="score only the first windows holding this many tokens (default: the whole file)")
    a("--variants", default="base",
      help=f"comma-separated engines to compare, of {', '.join(VARIANTS)}; the first is the "
           "baseline of the table's change column")
    a("--output-json", default=None, help="write the results here")


def read_text(name: str) -> str:
    """The text of ``name``: a packaged text (``BUILTIN_TEXTS``) or a file path (.gz: gzip)."""
    if name in BUILTIN_TEXTS:
        data = resources.files("fuselm.bench.data").joinpath(BUILTIN_TEXTS[name]).read_bytes()
        return gzip.decompress(data).decode("utf-8")
    path = Path(name)
    if not path.is_file():
        raise SystemExit(f"fuselm bench perplexity: no such file: {name} (or name one of "
                         f"{', '.join(BUILTIN_TEXTS)})")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


def windows(ids: list[int], window: int, max_scored: int | None) -> list[list[int]]:
    """Consecutive windows of ``window`` tokens (a shorter last one if it scores anything),
    enough to score ``max_scored`` tokens when given."""
    if window < 2:
        raise SystemExit("fuselm bench perplexity: --window must be at least 2")
    out: list[list[int]] = []
    scored = 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2 or (max_scored is not None and scored >= max_scored):
            break
        out.append(chunk)
        scored += len(chunk) - 1
    if not out:
        raise SystemExit("fuselm bench perplexity: the text has fewer than 2 tokens")
    return out


def parse_variants(text: str) -> list[str]:
    """The ``--variants`` list; an unknown name is refused by name."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"fuselm bench perplexity: unknown variant(s) {unknown or [text]}; "
                         f"choose from {', '.join(VARIANTS)}")
    return names


def variant_config(config: Any, variant: str) -> Any:
    """The engine config of one variant of ``config`` (``base``: itself)."""
    if variant == "base":
        return config
    if variant == "fp8-gptq":
        return dataclasses.replace(config, quantization="fp8", quantization_calibration="gptq")
    if variant == "kv-fp8":
        return dataclasses.replace(config, cache=dataclasses.replace(config.cache,
                                                                    kv_cache_dtype="fp8"))
    return dataclasses.replace(config, quantization=variant)


def score(llm: Any, prompts: list[list[int]]) -> dict[str, Any]:
    """Runs the windows through ``llm``; scored tokens, mean NLL, perplexity, seconds."""
    from fuselm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, prompt_logprobs=0,
                            detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    nll, n = 0.0, 0
    for out, prompt in zip(outputs, prompts, strict=True):
        entries = out.prompt_logprobs
        if entries is None or len(entries) != len(prompt):
            raise RuntimeError(f"request {out.request_id} returned no prompt logprobs")
        for pos in range(1, len(prompt)):
            nll -= entries[pos][prompt[pos]]  # type: ignore[index]
            n += 1
    mean = nll / n
    return {"scored_tokens": n, "nll": mean, "perplexity": math.exp(mean), "seconds": elapsed,
            "tokens_per_s": sum(len(p) for p in prompts) / elapsed}


def _describe(llm: Any) -> str:
    quant = llm.engine.model_config.quantization
    parts = [quant.describe() if quant is not None else "float weights"]
    kv = llm.config.cache.kv_cache_dtype
    parts.append(f"kv {kv}" if kv != "auto" else "kv as the model")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Scores the file with every variant; prints the table, writes --output-json."""
    import fuselm
    from fuselm.cli_args import engine_config_from_args

    variants = parse_variants(args.variants)
    if getattr(args, "llm", None) is not None and len(variants) > 1:
        raise SystemExit("fuselm bench perplexity: a caller's engine runs one variant")
    text = read_text(args.file)
    base_config = None if getattr(args, "llm", None) is not None else \
        engine_config_from_args(args)
    rows, results = [], []
    prompts: list[list[int]] | None = None
    for variant in variants:
        if base_config is None:  # a caller's engine (tests): one variant, itself
            llm = args.llm
        else:
            llm = fuselm.LLM(config=variant_config(base_config, variant))
        if prompts is None:
            ids = llm.engine.tokenizer.encode(text, add_special_tokens=False)
            prompts = windows(ids, args.window, args.max_scored_tokens)
        result = {"variant": variant, "runs": _describe(llm), **score(llm, prompts)}
        results.append(result)
        base = results[0]["perplexity"]
        rows.append({"variant": variant, "weights / KV": result["runs"],
                     "scored tokens": result["scored_tokens"], "nll": result["nll"],
                     "perplexity": result["perplexity"],
                     "change": f"{100.0 * (result['perplexity'] / base - 1.0):+.2f} %",
                     "tok/s": result["tokens_per_s"]})
        print(f"{variant}: perplexity {result['perplexity']:.4f} over "
              f"{result['scored_tokens']} tokens ({result['seconds']:.1f} s)", flush=True)
        if llm is not getattr(args, "llm", None):
            llm.engine.shutdown()
            del llm
            gc.collect()
    result = {"bench": NAME, "env": report.environment(), "file": args.file,
              "window": args.window, "variants": results}
    return report.finish(args, result, report.format_table(rows))
