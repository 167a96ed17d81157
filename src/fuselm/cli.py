"""``fuselm generate | chat | serve | bench | profile | plan``."""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from fuselm import __version__, envs
from fuselm.cli_args import add_engine_arguments, engine_config_from_args
from fuselm.errors import CheckpointError, FuselmError

# An optional package -> the extra of fuselm's pyproject.toml that installs it.
EXTRA_OF_PACKAGE = {"transformers": "hf", "httpx": "bench",
                    "matplotlib": "bench", "xgrammar": "structured"}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: the message, and where to find the flags."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def missing_package_message(command: str, exc: ImportError) -> str:
    """One line saying which package (and extra) ``fuselm COMMAND`` needs."""
    name = (exc.name or str(exc)).split(".")[0]
    extra = EXTRA_OF_PACKAGE.get(name)
    how = (f"install the {extra} extra: pip install 'fuselm[{extra}]' (in a checkout: "
           f"pip install -e '.[{extra}]')" if extra else
           "it is a dependency of fuselm: reinstall with pip install fuselm")
    return f"fuselm {command}: error: needs the package {name!r}, which is not installed; {how}"


def _installed(package: str) -> bool:
    if package in sys.modules:
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def missing_packages(args: argparse.Namespace) -> list[str]:
    """Optional packages the selected command will import and that are not installed (checked
    before it starts, so that a run does not fail at its end, when it writes its --plot)."""
    needs = []
    if getattr(args, "plot", None):
        needs.append("matplotlib")
    if getattr(args, "compare", None) == "hf":
        needs.append("transformers")
    if args.command_path == "bench serve":
        needs.append("httpx")
    return [name for name in needs if not _installed(name)]


def _version() -> str:
    try:
        return importlib.metadata.version("fuselm")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return __version__


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="tokens to generate at most (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 is greedy (default: 0.0)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling: keep the smallest set of tokens whose "
                             "probabilities sum to this (default: 1.0, every token)")
    parser.add_argument("--top-k", type=int, default=-1,
                        help="keep the k most likely tokens (default: -1, every token)")
    parser.add_argument("--sampling-seed", type=int, default=None,
                        help="seed of this request's sampling (unset: unseeded)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-text")


def _sampling_params(args: argparse.Namespace):
    from fuselm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed,
                          ignore_eos=args.ignore_eos)


@dataclass
class Answer:
    """One streamed answer: its text, token count, decode seconds, whether it was stopped."""

    text: str
    num_tokens: int
    decode_s: float
    stopped: bool


def _stream(engine, request_id: str, prompt: str, params,
            stop: Callable[[], bool] = lambda: False) -> Answer:
    """Runs one request, printing text as it arrives. When ``stop()`` turns true (checked
    between engine steps) the request is aborted, which frees its KV blocks."""
    engine.add_request(request_id, prompt, params)
    pieces: list[str] = []
    num_tokens, first, stopped = 0, None, False
    while engine.has_unfinished_requests():
        if stop():
            engine.abort_request(request_id)
            stopped = True
            break
        for out in engine.step():
            completion = out.outputs[0]
            if first is None and completion.token_ids:
                first = time.perf_counter()
            num_tokens = len(completion.token_ids)
            if completion.text_delta:
                pieces.append(completion.text_delta)
                print(completion.text_delta, end="", flush=True)
    print(" [stopped]" if stopped else "")
    decode_s = time.perf_counter() - first if first else 0.0
    return Answer("".join(pieces), num_tokens, decode_s, stopped)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generates an answer to PROMPT, streaming it to the terminal."""
    from fuselm.runtime import build_engine

    engine = build_engine(engine_config_from_args(args))
    prompt = args.prompt
    if not args.raw_prompt and engine.tokenizer.chat_template:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    answer = _stream(engine, "generate", prompt, _sampling_params(args))
    if args.verbose and answer.num_tokens > 1:
        ms = 1000 * answer.decode_s / (answer.num_tokens - 1)
        print(f"[{answer.num_tokens} tokens, {ms:.1f} ms/token decode]", file=sys.stderr)
    return 0


CHAT_HELP = """\
/help     this text
/history  the conversation so far, as the model sees it
/reset    forget the conversation (keeps the --system prompt)
/exit     quit (also Ctrl-D, or Ctrl-C at an empty prompt)
Ctrl-C during an answer stops the answer; arrow keys edit the line, up/down recall lines."""


class _StopFlag:
    """While active, Ctrl-C (SIGINT) sets a flag instead of raising KeyboardInterrupt, so that
    an answer stops between engine steps, never inside one."""

    def __init__(self) -> None:
        self.hit = False
        self._previous: Any = None

    def __call__(self) -> bool:
        return self.hit

    def __enter__(self) -> _StopFlag:
        self.hit = False
        self._previous = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.hit = True

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


class _PromptInterrupt(KeyboardInterrupt):
    """Ctrl-C at the prompt, with the text typed so far (readline clears its buffer before
    input() returns, so the signal handler reads it)."""

    def __init__(self, typed: str) -> None:
        super().__init__()
        self.typed = typed


def _read_line(prompt: str) -> str | None:
    """A line typed at ``prompt``; None to end the chat (Ctrl-D, or Ctrl-C on an empty line).
    Ctrl-C on a line with text drops the text, as a shell does."""
    try:
        import readline  # line editing and history for input(); absent on Windows
        buffer: Callable[[], str] = readline.get_line_buffer
    except ImportError:
        buffer = str

    def on_interrupt(signum: int, frame: Any) -> None:
        raise _PromptInterrupt(buffer())

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        return input(prompt)
    except EOFError:
        print()
        return None
    except _PromptInterrupt as exc:
        print()
        return "" if exc.typed else None
    finally:
        signal.signal(signal.SIGINT, previous)


def _chat_command(line: str, history: list[dict[str, str]], start: int) -> bool | None:
    """Runs a /command: False to quit, True when handled, None when ``line`` is no command."""
    word = line.strip()
    if word in ("/exit", "/quit"):
        return False
    if word == "/help":
        print(CHAT_HELP)
    elif word == "/reset":
        del history[start:]
        print("(conversation cleared)")
    elif word == "/history":
        for message in history:
            print(f"{message['role']}: {message['content']}")
    elif word.startswith("/"):
        print(f"unknown command {word}; /help lists the commands")
    else:
        return None
    return True


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive chat with history, using the model's chat template."""
    from fuselm.runtime import build_engine

    engine = build_engine(engine_config_from_args(args))
    history = [{"role": "system", "content": args.system}] if args.system else []
    start, turn, stop = len(history), 0, _StopFlag()
    print("fuselm chat: /help for commands, Ctrl-D to quit", flush=True)
    while (line := _read_line("you> ")) is not None:
        handled = _chat_command(line, history, start)
        if handled is False:
            break
        if handled or not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt = engine.tokenizer.apply_chat_template(history)
        print("assistant> ", end="", flush=True)
        try:
            with stop:
                answer = _stream(engine, f"chat-{turn}", prompt, _sampling_params(args), stop)
        except FuselmError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            history.pop()
            continue
        # a stopped answer stays in the history as far as it was shown
        history.append({"role": "assistant", "content": answer.text})
        turn += 1
    return 0


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
    ("bench", "perplexity"): ("fuselm.bench.perplexity", "teacher-forced perplexity of a text",
                              True),
    ("bench", "kernels"): ("fuselm.bench.kernels", "kernel benchmark", False),
    ("profile",): ("fuselm.profiling", "profile a workload", True),
    ("plan",): ("fuselm.planner", "memory and parallelism planner", False),
}


def _import_for(command: str, module: str):
    """The module behind a subcommand; a missing package is a one-line error (status 1)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SystemExit(missing_package_message(command, exc)) from exc


def _add_tool(sub, path: tuple[str, ...], selected: bool) -> None:
    """A tool's subcommand. Its module (and its flags) load only when the command line selects
    it, so that ``fuselm --help`` imports no kernel, Triton or server code."""
    module, help_text, engine = _TOOLS[path]
    parser = sub.add_parser(path[-1], help=help_text)
    parser.set_defaults(func=_delegate(module), command_path=" ".join(path))
    if not selected:
        return
    if engine:
        add_engine_arguments(parser)
    mod = _import_for(" ".join(path), module)
    if hasattr(mod, "add_arguments"):
        mod.add_arguments(parser)


def _add_serve(sub, selected: bool) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.set_defaults(func=cmd_serve, command_path="serve")
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
    parser = _Parser(prog="fuselm", description="fuselm: a fast LLM inference engine and "
                     "OpenAI-compatible server.", parents=[common])
    parser.add_argument("--version", action="version", version=f"fuselm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])  # type: ignore[method-assign]
    gen = sub.add_parser("generate", help="answer one prompt, streaming the text")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--raw-prompt", action="store_true", help="skip the chat template")
    chat = sub.add_parser("chat", help="interactive chat with history")
    chat.add_argument("--system", default=None, help="system prompt")
    for p, func, name in ((gen, cmd_generate, "generate"), (chat, cmd_chat, "chat")):
        add_engine_arguments(p, defaults={"max_num_seqs": 1})  # one sequence at a time
        _add_sampling_arguments(p)
        p.set_defaults(func=func, command_path=name)
    _add_serve(sub, words[:1] == ["serve"])
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    bench.add_parser = functools.partial(bench.add_parser, parents=[common])  # type: ignore
    for path in _TOOLS:
        _add_tool(bench if path[0] == "bench" else sub, path, list(path) == words[:len(path)])
    return parser


def _fail(command: str, message: str, status: int) -> int:
    print(f"fuselm {command}: error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fuselm`` console script."""
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    command = args.command_path
    if missing := missing_packages(args):
        print(missing_package_message(command, ImportError(name=missing[0])), file=sys.stderr)
        return 1
    if "engine.seed" in vars(args):
        try:  # bad flag values fail here, before any weight loads
            engine_config_from_args(args)
        except ValueError as exc:
            return _fail(command, f"{exc} (see fuselm {command} --help)", 2)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if "engine.seed" in vars(args) and envs.launcher_rank() > 0:
        from fuselm.distributed.launch import run_torchrun_worker  # torchrun rank > 0

        return run_torchrun_worker(engine_config_from_args(args))
    try:
        return args.func(args)
    except CheckpointError as exc:  # a bad file, not a usage error: the message names it
        return _fail(command, str(exc), 1)
    except FuselmError as exc:  # a bad flag, file or request: the message names it
        return _fail(command, str(exc), 2)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in EXTRA_OF_PACKAGE:
            raise
        print(missing_package_message(command, exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
