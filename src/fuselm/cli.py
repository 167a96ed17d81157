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


_BENCHES = {"latency": "fuselm.bench.latency", "throughput": "fuselm.bench.throughput",
            "serve": "fuselm.bench.serving", "kernels": "fuselm.bench.kernels"}


def _add_optional(sub, name: str, module: str, help_text: str, engine: bool) -> None:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return
    parser = sub.add_parser(name, help=help_text)
    if engine:
        add_engine_arguments(parser)
    if hasattr(mod, "add_arguments"):
        mod.add_arguments(parser)
    parser.set_defaults(func=_delegate(module))


def build_parser() -> argparse.ArgumentParser:
    """The whole command-line interface."""
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
    try:
        from fuselm.server.launcher import add_serve_arguments
    except ImportError:
        add_serve_arguments = None
    if add_serve_arguments is not None:
        serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
        add_engine_arguments(serve, model_positional=True)
        add_serve_arguments(serve)
        serve.set_defaults(func=cmd_serve)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bench.add_parser = functools.partial(bench.add_parser, parents=[common])  # type: ignore
    for name, module in _BENCHES.items():
        _add_optional(bench, name, module, f"{name} benchmark",
                      engine=name in ("latency", "throughput"))
    _add_optional(sub, "profile", "fuselm.profiling", "profile a workload", engine=True)
    _add_optional(sub, "plan", "fuselm.planner", "memory and parallelism planner", engine=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fuselm`` console script."""
    args = build_parser().parse_args(argv)
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
