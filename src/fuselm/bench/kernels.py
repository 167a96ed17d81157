"""``fuselm bench kernels``: every kernel backend at realistic sizes, against the card's ceiling.

For each case (op x shape): the median time of each registered backend, of the eager reference
and of ``torch.compile`` of the reference (plus op-specific baselines), achieved GB/s over the
op's minimum traffic (each input read once, each output written once), % of the copy bandwidth
measured in the same run, and the ratios to eager and compiled. Writes
``<output-dir>/kernels-<gpu>.md`` and ``.json`` and the tuning tables ``<op>.json``
(``{gpu: {bucket: {"backend": fastest, "triton": {best launch config}}}}``) that ``auto`` reads:
into ``--configs-dir``, else ``<output-dir>/configs/`` (``FUSELM_KERNEL_CONFIGS=<dir>`` makes the
engine read them); into the installed package's ``kernels/configs/`` only with
``--write-package-configs`` (``resolve_configs_dir``).

More ops join through ``CASE_PROVIDERS``: a ``"module:function"`` entry whose function takes the
preset name and returns a list of ``KernelCase``; a provider module that is absent is skipped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fuselm.bench import common
from fuselm.bench.kernel_cases import KernelCase
from fuselm.kernels import triton_utils

logger = logging.getLogger(__name__)

CASE_PROVIDERS = [
    "fuselm.bench.kernel_cases:core_cases",
    "fuselm.bench.kernels_attention:attention_cases",  # prefill and paged attention
]
PRESETS = ("full", "quick", "tiny")
REGISTRY_BACKENDS = ("reference", "triton", "cuda")


def load_cases(preset: str, ops: set[str] | None = None) -> list[KernelCase]:
    """Cases of every provider in ``CASE_PROVIDERS`` (absent provider modules are skipped)."""
    cases: list[KernelCase] = []
    for entry in CASE_PROVIDERS:
        module_name, func = entry.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            logger.info("bench provider %s not present; skipped", module_name)
            continue
        cases += getattr(module, func)(preset)
    return [c for c in cases if ops is None or c.op in ops]


# ---- measuring ---------------------------------------------------------------------------------


def _candidates(case: KernelCase, device: torch.device, compile_ref: bool) -> dict[str, Callable]:
    from fuselm.kernels import available_backends, resolve

    found: dict[str, Callable] = {"eager": case.reference}
    if compile_ref:
        found["compile"] = torch.compile(case.reference, dynamic=False)
        found.update({name: make() for name, make in case.baselines.items()})
    for backend in available_backends(case.op):
        if backend != "reference" and (device.type == "cuda" or backend == "triton"):
            found[backend] = resolve(case.op, backend, device)
    return found


def _time_all(
    case: KernelCase, inputs: tuple, device: torch.device, compile_ref: bool, sweep: bool
) -> tuple[dict[str, float], dict[str, float], dict[str, dict]]:
    """Microseconds of every candidate (and Triton config), host us of the fast backends."""
    times: dict[str, float] = {}
    host: dict[str, float] = {}
    configs: dict[str, dict] = {}
    for name, fn in _candidates(case, device, compile_ref).items():
        call = lambda f=fn: f(*inputs)
        try:
            times[name] = common.time_ms(call, device) * 1e3
            if name in ("triton", "cuda") and device.type == "cuda":
                host[name] = common.time_host_us(call, device)
        except Exception as err:  # one broken baseline must not stop the run
            logger.warning("%s %s %s failed: %s", case.op, case.shape, name, err)
    if sweep and case.triton_variants is not None and "triton" in times:
        for label, (cfg, fn) in case.triton_variants(inputs).items():
            times[f"triton[{label}]"] = common.time_ms(fn, device) * 1e3
            configs[f"triton[{label}]"] = cfg
    return times, host, configs


def measure_case(case: KernelCase, device: torch.device, dtype: torch.dtype, copy_gbs: float,
                 compile_ref: bool = True, sweep: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """One row per backend or baseline: time, host time, GB/s, % of copy bandwidth, ratios."""
    inputs = case.make_args(device, dtype)
    nbytes = case.bytes_moved(inputs)
    times, host, configs = _time_all(case, inputs, device, compile_ref, sweep)
    baselines = [b for b in times if b in ("eager", "compile") or b in case.baselines]
    rows = []
    for name, us in times.items():
        ratios = {base: times[base] / us for base in baselines}
        gbs = nbytes / (us * 1e-6) / 1e9
        rows.append({"op": case.op, "shape": case.shape, "backend": name, "us": us,
                     "host_us": host.get(name), "GB/s": gbs, "%copy": 100 * gbs / copy_gbs,
                     "x_eager": ratios.get("eager"), "x_compile": ratios.get("compile"),
                     "ratios": ratios, "bucket": case.bucket, "config": configs.get(name),
                     "bytes": nbytes})  # fmt: skip
    return rows


def check_targets(cases: list[KernelCase], rows: list[dict]) -> list[dict[str, Any]]:
    """For each case target and fast backend: the measured ratio and whether it is met."""
    out = []
    for case in cases:
        for row in rows:
            if (row["op"], row["shape"]) != (case.op, case.shape):
                continue
            if row["backend"] not in ("triton", "cuda"):
                continue
            for baseline, minimum in case.targets:
                copy = baseline == "copy"
                value = row["%copy"] / 100 if copy else row["ratios"].get(baseline)
                met = value is not None and value >= minimum
                metric = "fraction of copy bw" if copy else f"x vs {baseline}"
                out.append({"op": case.op, "shape": case.shape, "backend": row["backend"],
                            "metric": metric, "value": value, "target": minimum,
                            "met": "yes" if met else "NO"})  # fmt: skip
    return out


# ---- the tuning table --------------------------------------------------------------------------


def _geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def _bucket_config(cases: list[list[dict]]) -> dict | None:
    """The swept Triton config of a bucket: one case, its fastest; several cases sharing the
    bucket (one table entry serves them all), the best geometric mean of each config's time over
    the fastest of its case, among configs swept in every case."""
    per_case = [{r["backend"]: r for r in rows if r["config"] is not None} for rows in cases]
    common_labels = set.intersection(*(set(c) for c in per_case)) if per_case else set()
    if not common_labels:
        return None

    def score(label: str) -> float:
        return _geomean([c[label]["us"] / min(r["us"] for r in c.values()) for c in per_case])

    return per_case[0][min(sorted(common_labels), key=score)]["config"]


def _registered_times(rows: list[dict], config: dict | None) -> dict[str, float]:
    """Backend -> time of one case, triton at the bucket's chosen config where it is faster."""
    times = {("reference" if r["backend"] == "eager" else r["backend"]): r["us"] for r in rows
             if r["backend"] in ("triton", "cuda", "eager")}
    chosen = [r["us"] for r in rows if config is not None and r["config"] == config]
    if chosen and "triton" in times:  # the table makes the op launch that config
        times["triton"] = min(times["triton"], chosen[0])
    return times


def tuning_tables(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """op -> bucket -> {"backend": fastest registered backend, "triton": best config}; plus a
    "default" bucket per op: the backend with the best geometric-mean slowdown over its cases.
    Cases that share a bucket get one entry chosen over all of them (``_bucket_config``)."""
    by_bucket: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for row in rows:
        if row["bucket"] is not None:
            by_bucket.setdefault((row["op"], row["bucket"]), {}).setdefault(
                row["shape"], []).append(row)
    tables: dict[str, dict[str, dict]] = {}
    slowdowns: dict[str, dict[str, list[float]]] = {}
    for (op, bucket), shapes in by_bucket.items():
        cases = list(shapes.values())
        config = _bucket_config(cases)
        times = [t for t in (_registered_times(c, config) for c in cases) if t]
        if not times:
            continue
        backends = set.intersection(*(set(t) for t in times))
        best = min(backends, key=lambda b: _geomean([t[b] / min(t.values()) for t in times]))
        entry: dict[str, Any] = {
            "backend": best,
            "us": {b: round(sum(t[b] for t in times), 2) for b in sorted(backends)},
        }
        if config is not None:
            entry["triton"] = config
        tables.setdefault(op, {})[bucket] = entry
        for t in times:
            for b in backends:
                slowdowns.setdefault(op, {}).setdefault(b, []).append(t[b] / min(t.values()))
    for op, per_backend in slowdowns.items():
        complete = {
            b: v for b, v in per_backend.items() if len(v) == max(map(len, per_backend.values()))
        }
        geo = {b: _geomean(v) for b, v in complete.items()}
        tables[op]["default"] = {"backend": min(geo, key=geo.get), "geomean_slowdown": geo}
    return tables


def write_tuning_tables(tables: dict[str, dict], gpu_name: str, configs_dir: Path) -> list[Path]:
    """Merges this GPU's entries into ``configs_dir/<op>.json``: other GPUs' entries and buckets
    not measured now are kept, and an entry measured without a sweep keeps the Triton config
    the table had."""
    written = []
    gpu = common.gpu_key(gpu_name)
    for op, buckets in tables.items():
        path = configs_dir / f"{op}.json"
        table = json.loads(path.read_text()) if path.exists() else {}
        merged = dict(table.get(gpu, {}))
        for bucket, entry in buckets.items():
            old = merged.get(bucket, {})
            if "triton" not in entry and isinstance(old, dict) and "triton" in old:
                entry = {**entry, "triton": old["triton"]}
            merged[bucket] = entry
        table[gpu] = merged
        if torch.cuda.is_available():
            caps = table.setdefault(triton_utils.CAPABILITY_KEY, {})
            caps[gpu] = "{}.{}".format(*torch.cuda.get_device_capability())
        written.append(common.write_json(path, dict(sorted(table.items()))))
    triton_utils.clear_config_caches()
    return written


# ---- report and entry points --------------------------------------------------------------------

TABLE_COLUMNS = ("op", "shape", "backend", "us", "host_us", "GB/s", "%copy", "x_eager", "x_compile")


def _markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# Kernel benchmark: {env.get('gpu') or 'cpu'}",
        "",
        f"{env['time']}, commit `{env.get('commit')}`, torch {env['torch']}, triton "
        f"{env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver')}, dtype "
        f"{result['dtype']}, CUDA extension: {result['extension']}.",
        "",
        f"Copy bandwidth of this card, this run: **{result['copy_gbs']:.0f} GB/s** (1 GiB "
        "device-to-device copy, bytes read + written, median). Times: median of CUDA-event "
        "timings with L2 flushed between repetitions (`triton.testing.do_bench`); `host_us`: wall "
        "time a call, back to back (the launch cost at small sizes). GB/s over each op's minimum "
        "traffic; `x_eager`/`x_compile`: speed-up over the eager / `torch.compile`d reference.",
    ]
    for op in dict.fromkeys(r["op"] for r in result["rows"]):
        lines += ["", f"## {op}", "",
                  common.markdown_table([r for r in result["rows"] if r["op"] == op],
                                        TABLE_COLUMNS)]  # fmt: skip
    if result["targets"]:
        lines += ["", "## Targets (issue 3)", "", common.markdown_table(result["targets"])]
    if result.get("tuning"):
        lines += ["", "## Tuning table (`kernels/configs/`)", ""]
        for op, buckets in result["tuning"].items():
            picks = ", ".join(f"{b}: {e['backend']}" for b, e in buckets.items())
            lines.append(f"- {op}: {picks}")
    overhead = [{"path": k, "us": v} for k, v in result["overhead"].items()]
    lines += ["", "## Dispatch overhead (host, empty op, us a call)", ""]
    lines.append(common.markdown_table(overhead))
    return "\n".join(lines) + "\n"


def run_kernel_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the benchmark that ``args`` (see ``add_arguments``) describes; returns the record."""
    from fuselm.kernels import extension

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)  # fmt: skip
    dynamo = torch._dynamo.config  # one compiled reference per shape
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    ops = set(args.ops.split(",")) if args.ops else None
    cases = load_cases(args.preset, ops)
    env = common.environment()
    copy_gbs = common.copy_bandwidth_gbs(device)
    print(f"{env.get('gpu') or 'cpu'}: copy bandwidth {copy_gbs:.0f} GB/s; {len(cases)} cases")
    rows = []
    for case in cases:
        torch.manual_seed(0)
        case_rows = measure_case(
            case, device, dtype, copy_gbs, not args.no_compile, not args.no_sweep
        )
        print(common.format_table(case_rows, TABLE_COLUMNS), flush=True)
        rows += case_rows
    result = {"environment": env, "dtype": str(dtype).removeprefix("torch."),
              "device": str(device), "extension": extension.extension_status(),
              "copy_gbs": copy_gbs, "rows": rows, "targets": check_targets(cases, rows),
              "overhead": common.dispatch_overhead_us()}  # fmt: skip
    if device.type == "cuda":
        result["tuning"] = tuning_tables(rows)
        configs_dir = resolve_configs_dir(args)
        if configs_dir is not None:
            written = write_tuning_tables(result["tuning"], env["gpu"], configs_dir)
            result["configs_written"] = [str(p) for p in written]
            print(configs_note(configs_dir))
    out_dir = Path(args.output_dir)
    stem = f"kernels-{common.gpu_slug(env.get('gpu'))}"
    common.write_json(out_dir / f"{stem}.json", result)
    (out_dir / f"{stem}.md").write_text(_markdown(result))
    print("\n" + common.format_table(result["targets"]) if result["targets"] else "")
    print(f"wrote {out_dir / stem}.md and .json")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``fuselm bench kernels``."""

    parser.add_argument("--ops", default=None, help="comma-separated ops (default: all)")
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="full",
        help="sizes: full (the issue's), quick (headline + decode), tiny (CPU CI)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float16", "float32"),
        help="default: bfloat16 on GPU, float32 on CPU",
    )
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    parser.add_argument("--no-sweep", action="store_true", help="skip the Triton config sweep")
    parser.add_argument("--output-dir", default="docs/perf", help="where the .md and .json go")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    add_configs_arguments(parser)


def add_configs_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the tuning tables go (``resolve_configs_dir``); shared by the kernel benches."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--configs-dir", default=None,
                       help="write the tuning tables (<op>.json) here (default: "
                            "<output-dir>/configs)")
    where.add_argument("--write-package-configs", action="store_true",
                       help="write them into the installed package's kernels/configs/, the "
                            "defaults every run reads")
    where.add_argument("--no-write-configs", action="store_true",
                       help="do not write the tuning tables")


def resolve_configs_dir(args: argparse.Namespace, fallback_output: str = "out") -> Path | None:
    """Where the tuning tables go: the package's ``kernels/configs/`` only with
    ``--write-package-configs``; else ``--configs-dir``; else ``<output-dir>/configs`` (the
    output dir, or ``fallback_output`` when there is none); None with ``--no-write-configs``."""
    if getattr(args, "no_write_configs", False):
        return None
    if getattr(args, "write_package_configs", False):
        return Path(triton_utils._CONFIG_DIR)
    if getattr(args, "configs_dir", None):
        return Path(args.configs_dir)
    return Path(getattr(args, "output_dir", None) or fallback_output) / "configs"


def configs_note(configs_dir: Path) -> str:
    """How the written tables become the ones a run reads."""
    if configs_dir.resolve() == Path(triton_utils._CONFIG_DIR).resolve():
        return f"tuning tables written into the package: {configs_dir}"
    return (f"tuning tables written to {configs_dir} (FUSELM_KERNEL_CONFIGS={configs_dir} reads "
            "them; --write-package-configs makes them the package's defaults)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``fuselm bench kernels`` (the CLI passes its parsed arguments)."""
    result = run_kernel_bench(args)
    return 1 if any(t["met"] == "NO" for t in result["targets"]) and args.strict else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fuselm.bench.kernels [flags]``."""
    parser = argparse.ArgumentParser(prog="fuselm bench kernels", description=__doc__)
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
