"""``fuselm generate | chat | serve | bench | profile | plan``."""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys
import time
from collections.abc import Callable

from fuselm import envs
from fuselm.cli_args import add_engine_arguments, engine_config_from_args
from fuselm.errors import FuselmError


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--sampling-seed", type=int, default=None,
                        help="seed of this request's sampling (default: unseeded)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-text")


def _sampling_params(args: argparse.Namespace):
    from fuselm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed,
                          ignore_eos=args.ignore_eos)


def _stream(engine, request_id: str, prompt: str, params) -> tuple[str, int, float]:
    """Runs one request, printing text as it arrives; returns text, tokens, decode seconds."""
    engine.add_request(request_id, prompt, params)
    pieces: list[str] = []
    num_tokens, first = 0, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            completion = out.outputs[0]
            if first is None and completion.token_ids:
                first = time.perf_counter()
            num_tokens = len(completion.token_ids)
            if completion.text_delta:
                pieces.append(completion.text_delta)
                print(completion.text_delta, end="", flush=True)
    print()
    decode_s = time.perf_counter() - first if first else 0.0
    return "".join(pieces), num_tokens, decode_s


def cmd_generate(args: argparse.Namespace) -> int:
    """Generates an answer to PROMPT, streaming it to the terminal."""
    from fuselm.runtime import build_engine

    engine = build_engine(engine_config_from_args(args))
    prompt = args.prompt
    if not args.raw_prompt and engine.tokenizer.chat_template:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    _, num_tokens, decode_s = _stream(engine, "generate", prompt, _sampling_params(args))
    if args.verbose and num_tokens > 1:
        print(f"[{num_tokens} tokens, {1000 * decode_s / (num_tokens - 1):.1f} ms/token decode]",
              file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive chat with history, using the model's chat template."""
    from fuselm.runtime import build_engine

    engine = build_engine(engine_config_from_args(args))
    history = [{"role": "system", "content": args.system}] if args.system else []
    turn = 0
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt = engine.tokenizer.apply_chat_template(history)
        print("assistant> ", end="", flush=True)
        try:
            text, _, _ = _stream(engine, f"chat-{turn}", prompt, _sampling_params(args))
        except FuselmError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": text})
        turn += 1


def cmd_serve(args: argparse.Namespace) -> int:
    """Runs the OpenAI-compatible HTTP server."""
    from fuselm.server.launcher import main as serve_main

    return serve_main(args)


def _delegate(module: str, name: str = "run") -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        result = getattr(importlib.import_module(module), name)(args)
        return result if isinstance(result, int) else 0

    return run


# subcommand path -> (module that implements it, help, takes the engine flags)
_TOOLS = {
    ("bench", "latency"): ("fuselm.bench.latency", "latency benchmark", True),
    ("bench", "throughput"): ("fuselm.bench.throughput", "throughput benchmark", True),
    ("bench", "serve"): ("fuselm.bench.serving", "serving benchmark (an HTTP client)", False),
    ("bench", "kernels"): ("fuselm.bench.kernels", "kernel benchmark", False),
    ("profile",): ("fuselm.profiling", "profile a workload", True),
    ("plan",): ("fuselm.planner", "memory and parallelism planner", False),
}


def _import_for(command: str, module: str):
    """The module behind a subcommand; a missing optional package is a clear error."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SystemExit(f"error: `fuselm {command}` needs the package {exc.name!r}, which is "
                         f"not installed ({exc})") from exc


def _add_tool(sub, path: tuple[str, ...], selected: bool) -> None:
    """A tool's subcommand. Its module (and its flags) load only when the command line selects
    it, so that ``fuselm --help`` imports no kernel, Triton or server code."""
    module, help_text, engine = _TOOLS[path]
    parser = sub.add_parser(path[-1], help=help_text)
    parser.set_defaults(func=_delegate(module))
    if not selected:
        return
    if engine:
        add_engine_arguments(parser)
    mod = _import_for(" ".join(path), module)
    if hasattr(mod, "add_arguments"):
        mod.add_arguments(parser)


def _add_serve(sub, selected: bool) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.set_defaults(func=cmd_serve)
    if not selected:
        return
    add_engine_arguments(serve, model_positional=True)
    _import_for("serve", "fuselm.server.launcher").add_serve_arguments(serve)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command-line interface for ``argv`` (default: ``sys.argv[1:]``): every subcommand
    is listed; only the selected one gets its flags (and imports its module)."""
    words = [w for w in (sys.argv[1:] if argv is None else argv) if not w.startswith("-")]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log progress and speed")
    parser = argparse.ArgumentParser(prog="fuselm", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])  # type: ignore[method-assign]
    gen = sub.add_parser("generate", help="answer one prompt, streaming the text")
    gen.add_argument("prompt")
    gen.add_argument("--raw-prompt", action="store_true", help="skip the chat template")
    chat = sub.add_parser("chat", help="interactive chat with history")
    chat.add_argument("--system", default=None, help="system prompt")
    for p, func in ((gen, cmd_generate), (chat, cmd_chat)):
        add_engine_arguments(p)
        _add_sampling_arguments(p)
        p.set_defaults(func=func)
    _add_serve(sub, words[:1] == ["serve"])
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bench.add_parser = functools.partial(bench.add_parser, parents=[common])  # type: ignore
    for path in _TOOLS:
        _add_tool(bench if path[0] == "bench" else sub, path, list(path) == words[:len(path)])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fuselm`` console script."""
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if "engine.seed" in vars(args):
        try:  # bad flag values fail here, before any weight loads
            engine_config_from_args(args)
        except ValueError as exc:
            parser.error(str(exc))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if "engine.seed" in vars(args) and envs.launcher_rank() > 0:
        from fuselm.distributed.launch import run_torchrun_worker  # torchrun rank > 0

        return run_torchrun_worker(engine_config_from_args(args))
    try:
        return args.func(args)
    except FuselmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
