"""`fuselm bench latency|throughput|serve`, `fuselm profile` and `fuselm plan` parse their flags
next to the engine flags without clashes, and `fuselm plan` runs from the command line."""

from __future__ import annotations

import json

import pytest

from fuselm import cli


@pytest.mark.parametrize("argv", [
    ["bench", "latency", "--batch-size", "1", "4", "--input-len", "8", "--output-len", "4",
     "--compare", "hf", "--load-format", "dummy", "--max-num-seqs", "8", "--plot", "x.png"],
    ["bench", "throughput", "--num-prompts", "3", "--dataset", "p.jsonl", "--dtype", "float32"],
    ["bench", "serve", "--base-url", "http://h:1", "--model", "m", "--request-rate", "1", "inf",
     "--max-concurrency", "4", "--goodput", "ttft:100", "tpot:10"],
    ["profile", "--batch-size", "2", "--output-dir", "d", "--ncu", "--device", "cpu"],
    ["plan", "--model", "30B", "--gpu", "A100-80GB", "--num-nodes", "4", "-tp", "8", "-pp", "4"],
])
def test_flags_parse(argv):
    args = cli.build_parser(argv).parse_args(argv)
    assert callable(args.func)


def test_fuselm_plan_cli(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = cli.main(["plan", "--model", "Llama-3-70B", "--gpu", "H100", "--num-nodes", "1",
                   "--context-len", "8192", "--output-json", str(out)])
    assert rc == 0 and "recommended:" in capsys.readouterr().out
    plan = json.loads(out.read_text())
    assert plan["recommended"]["tensor_parallel_size"] in (4, 8)
    assert all(p["weight_gib"] < 80 for p in plan["layouts"] if p["feasible"])
