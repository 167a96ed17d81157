"""What structured outputs cost: the grammar libraries side by side, and the engine's decode
step with and without token masks.

``libraries``: xgrammar and llguidance (``pip install llguidance`` for the comparison only) on
the default model's vocabulary (SmolLM2, 49,152 tokens) and on a 128,256-token byte-level BPE
built from it (its tokens plus merges of random pairs of them: every new token is a real BPE
token; Llama 3's size, offline): tokenizer setup, JSON-schema compile, compile + first mask,
the per-step mask at batch 1 (one matcher walking a valid document) and at batch N (N
matchers at staggered positions, one batched fill per step on --threads threads).

``step``: the decode step of N sequences with every sequence free (greedy; with async
scheduling, then without it: a constrained batch never runs ahead), then every sequence
constrained (a JSON schema whose string fields never close within the run, so the mask works
at every step), then free again, in one run; prints the step times, their ratios, the host
time of the mask fill per step and the device time of applying it. ``--shape llama-3-8b``
serves dummy weights at that shape with the 128k tokenizer above (a GPU); the default is the
default model (CPU works).

Usage:
  python scripts/bench_structured.py libraries [--threads 8] [--batch-size 64]
  python scripts/bench_structured.py tokenizer --out tok128k.json   (where the default model is)
  python scripts/bench_structured.py tokenizer --from-tiktoken tokenizer.model --out llama3.json
      (Llama 3's real vocabulary: its tiktoken ranks file, as meta-llama/llama-models ships it)
  python scripts/bench_structured.py fill --tokenizer-json F [--threads 1 8 15]
  python scripts/bench_structured.py step [--shape llama-3-8b] [--batch-size 64]
      [--max-tokens 128] [--device cuda] [--tokenizer-json F]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer

from fuselm.loading.default_model import default_model_path
from fuselm.tokenizer import Tokenizer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "maxLength": 40},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "status": {"enum": ["active", "inactive", "banned"]},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False},
        "score": {"type": "number"},
        "verified": {"type": "boolean"},
    },
    "required": ["id", "name", "email", "tags", "status", "address", "score", "verified"],
    "additionalProperties": False,
}
INSTANCE = {"id": 12345, "name": "Ada Lovelace", "email": "ada@example.com",
            "tags": ["math", "poetry", "engines"], "status": "active",
            "address": {"street": "12 St James's Square", "city": "London", "zip": "12345"},
            "score": 98.5, "verified": True}
LLAMA3_VOCAB = 128256


def extend_vocab(tok_json: str, target: int, seed: int = 0) -> str:
    """A byte-level BPE of ``target`` tokens: ``tok_json``'s plus merges of random pairs."""
    data = json.loads(tok_json)
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    rng = random.Random(seed)
    pieces = [t for t in vocab if not t.startswith("<|")]
    next_id = max(max(vocab.values()), *(a["id"] for a in data["added_tokens"])) + 1
    while next_id < target:
        a, b = rng.choice(pieces), rng.choice(pieces)
        if a + b in vocab or len(a + b) > 16:
            continue
        vocab[a + b] = next_id
        merges.append([a, b] if merges and isinstance(merges[0], list) else f"{a} {b}")
        next_id += 1
    return json.dumps(data)


# -- libraries ---------------------------------------------------------------------------------


class _Xgrammar:
    name = "xgrammar"

    def __init__(self, tok_json: str, eos: int, threads: int) -> None:
        import xgrammar as xgr

        from fuselm.structured.compiler import encoded_vocab, vocab_spelling

        self.xgr = xgr
        t0 = time.perf_counter()
        tok = Tokenizer(HFTokenizer.from_str(tok_json), eos_token_id=eos)
        spelling, prefix = vocab_spelling(json.loads(tok_json))
        self.info = xgr.TokenizerInfo(encoded_vocab(tok, tok.vocab_size),
                                      getattr(xgr.VocabType, spelling), stop_token_ids=[eos],
                                      add_prefix_space=prefix)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self.setup_s = time.perf_counter() - t0
        self.vocab_size = self.info.vocab_size
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema))

    def matcher(self, grammar: Any) -> Any:
        return self.xgr.GrammarMatcher(grammar)

    def bitmask(self, n: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(n, self.vocab_size)

    def fill(self, m: Any, bitmask: torch.Tensor, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, ms: list[Any], bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(ms, bitmask)

    def accept(self, m: Any, token: int) -> None:
        if not m.accept_token(token):
            raise RuntimeError(f"xgrammar rejected {token}")


class _Llguidance:
    name = "llguidance"

    def __init__(self, tok_json: str, eos: int, threads: int) -> None:
        import llguidance
        import llguidance.torch as llt

        self.llg, self.llt = llguidance, llt
        t0 = time.perf_counter()
        self.tok = llguidance.LLTokenizer(tok_json, eos_token=eos)
        self.setup_s = time.perf_counter() - t0
        self.vocab_size = self.tok.vocab_size
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        matcher = self.llg.LLMatcher(self.tok, grammar)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        return grammar

    def matcher(self, grammar: Any) -> Any:
        return self.llg.LLMatcher(self.tok, grammar)

    def bitmask(self, n: int) -> torch.Tensor:
        return self.llt.allocate_token_bitmask(n, self.vocab_size)

    def fill(self, m: Any, bitmask: torch.Tensor, row: int) -> None:
        self.llt.fill_next_token_bitmask(m, bitmask, row)

    def fill_batch(self, ms: list[Any], bitmask: torch.Tensor) -> None:
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)],
                                             bitmask)

    def accept(self, m: Any, token: int) -> None:
        if not m.consume_token(token):
            raise RuntimeError(m.get_error())


def _measure(lib: Any, tokens: list[int], batch: int) -> dict[str, float]:
    compiles = []
    for k in range(5):  # a new title each time: nothing cached
        t0 = time.perf_counter()
        grammar = lib.compile(dict(SCHEMA, title=f"t{k}"))
        compiles.append(time.perf_counter() - t0)
    t0 = time.perf_counter()  # llguidance builds its lexer lazily, at the first mask
    lib.fill(lib.matcher(lib.compile(dict(SCHEMA, title="first"))), lib.bitmask(1), 0)
    first = time.perf_counter() - t0
    m, bm, fills = lib.matcher(grammar), lib.bitmask(1), []
    for token in tokens:
        t0 = time.perf_counter()
        lib.fill(m, bm, 0)
        fills.append(time.perf_counter() - t0)
        lib.accept(m, token)
    ms = [lib.matcher(grammar) for _ in range(batch)]
    offsets = [i * 7 % len(tokens) for i in range(batch)]
    for m_, off in zip(ms, offsets, strict=True):
        for token in tokens[:off]:
            lib.accept(m_, token)
    bmb, steps = lib.bitmask(batch), []
    for step in range(min(40, len(tokens))):
        t0 = time.perf_counter()
        lib.fill_batch(ms, bmb)
        steps.append(time.perf_counter() - t0)
        for m_, off in zip(ms, offsets, strict=True):
            if (off + step) < len(tokens):
                lib.accept(m_, tokens[off + step])
    return {"setup_s": lib.setup_s, "compile_ms": statistics.median(compiles) * 1e3,
            "compile_first_mask_ms": first * 1e3,
            "mask_b1_us_mean": statistics.mean(fills) * 1e6,
            "mask_b1_us_median": statistics.median(fills) * 1e6,
            "mask_bN_ms_mean": statistics.mean(steps) * 1e3,
            "mask_bN_ms_median": statistics.median(steps) * 1e3}


def run_libraries(args: argparse.Namespace) -> None:
    """Prints one row per (vocabulary, library)."""
    base = Tokenizer.from_gguf(default_model_path())
    tok_json = base.tokenizer.to_str()
    vocabs = [("SmolLM2 49k", tok_json), ("128k BPE", extend_vocab(tok_json, LLAMA3_VOCAB))]
    text = json.dumps(INSTANCE)
    print(f"threads {args.threads}, batch {args.batch_size}; times: median of the steps "
          "(mean where said)")
    header = ("vocab", "library", "setup s", "compile ms", "compile+1st mask ms",
              "mask b1 us med", "mask b1 us mean", f"mask b{args.batch_size} ms med",
              f"mask b{args.batch_size} ms mean")
    print(" | ".join(header))
    for label, tj in vocabs:
        tokens = HFTokenizer.from_str(tj).encode(text, add_special_tokens=False).ids
        for cls in (_Xgrammar, _Llguidance):
            try:
                lib = cls(tj, base.eos_token_id or 0, args.threads)
            except ImportError as exc:
                print(f"{label} | {cls.name} | not installed ({exc.name})")
                continue
            r = _measure(lib, tokens, args.batch_size)
            print(" | ".join([label, cls.name, f"{r['setup_s']:.2f}", f"{r['compile_ms']:.1f}",
                              f"{r['compile_first_mask_ms']:.1f}",
                              f"{r['mask_b1_us_median']:.1f}", f"{r['mask_b1_us_mean']:.1f}",
                              f"{r['mask_bN_ms_median']:.2f}", f"{r['mask_bN_ms_mean']:.2f}"]),
                  flush=True)


# -- engine step -------------------------------------------------------------------------------

# strings that never close within the run, so every step needs a real mask
OPEN_SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "items": {
    "type": "string"}}}, "required": ["notes"]}


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the spelling of byte-level BPE vocabularies)."""
    from tokenizers import pre_tokenizers

    chars = pre_tokenizers.ByteLevel.alphabet()
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "
                 and not (0x7F <= b <= 0xA0) and b != 0xAD]
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(others)})
    if set(mapping.values()) != set(chars):
        raise RuntimeError("unexpected byte-level alphabet")
    return mapping


def tiktoken_tokenizer(ranks_file: Path) -> str:
    """A tokenizer.json (byte-level BPE) of a tiktoken ranks file (``base64 rank`` lines) plus
    Llama 3's 256 special tokens: merges follow the ranks, as tiktoken's BPE applies them."""
    import base64

    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    alphabet = _byte_alphabet()
    ranks: dict[bytes, int] = {}
    for line in ranks_file.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)

    def spell(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        splits = [(max(ranks[token[:i]], ranks[token[i:]]), token[:i], token[i:])
                  for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        if splits:
            _, left, right = min(splits)
            merges.append((rank, spell(left), spell(right)))
    merges.sort()
    vocab = {spell(t): r for t, r in ranks.items()}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, a, b in merges],
                                ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(__import__("tokenizers").Regex(_LLAMA3_SPLIT), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
             "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
             "<|python_tag|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(2, LLAMA3_VOCAB - len(ranks)
                                                                - len(names) + 2)]
    tk.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    if tk.get_vocab_size() != LLAMA3_VOCAB:
        raise RuntimeError(f"built {tk.get_vocab_size()} tokens, expected {LLAMA3_VOCAB}")
    return tk.to_str()


def llama3_size_tokenizer() -> str:
    """The 128k-token BPE (tokenizer.json text) built from the default model's vocabulary."""
    base = Tokenizer.from_gguf(default_model_path())
    return extend_vocab(base.tokenizer.to_str(), LLAMA3_VOCAB)


def _dummy_8b(folder: Path, tokenizer_json: Path | None) -> str:
    from fuselm.bench.dummy_model import write_dummy_checkpoint

    path = write_dummy_checkpoint("llama-3-8b", folder, bos_token_id=1, eos_token_id=2)
    (path / "tokenizer.json").write_text(
        tokenizer_json.read_text() if tokenizer_json else llama3_size_tokenizer())
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}))
    return str(path)


def _timed_run(llm: Any, prompts: list[list[int]], params: Any) -> tuple[float, int]:
    """Seconds per decode step (first token excluded) and steps, over one batch."""
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"b{time.perf_counter_ns()}-{i}", prompt, params)
    while any(not seq.output_token_ids for state in engine.requests.values()
              for seq in state.sequences):
        engine.step()  # prefills
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return (time.perf_counter() - t0) / max(steps, 1), steps


def _text_like_head(llm: Any) -> None:
    """Zeroes the dummy LM head's rows of every token but lower-case ASCII words (" the",
    "ing"), so that greedy decoding writes word-like text inside the JSON strings, as a real
    model does, instead of random tokens (partial UTF-8, escapes): the grammar's mask work
    depends on the text it has matched."""
    import re

    word = re.compile(r" ?[a-z]{2,12}")
    hf = llm.tokenizer.tokenizer
    keep = torch.zeros(llm.model_config.vocab_size, dtype=torch.bool)
    for token_id in range(min(hf.get_vocab_size(), keep.numel())):
        if word.fullmatch(hf.decode([token_id])):
            keep[token_id] = True
    head = llm.engine.runner.model.lm_head.weight
    head.data[~keep.to(head.device)] = 0


def run_step(args: argparse.Namespace) -> None:
    """Prints free and constrained step times at ``--batch-size``."""
    import fuselm.engine.sampling_inputs as sampling_inputs
    from fuselm import LLM, SamplingParams
    from fuselm.sampling_params import StructuredOutputsParams

    kwargs: dict[str, Any] = {"device": args.device, "max_model_len": 1024,
                              "max_num_seqs": max(args.batch_size, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape == "llama-3-8b":
            llm = LLM(_dummy_8b(Path(tmp), args.tokenizer_json), load_format="dummy",
                      dtype="bfloat16", **kwargs)
        else:
            llm = LLM(**kwargs, cpu_kv_cache_gib=1.0) if args.device == "cpu" else LLM(**kwargs)
        fill_times: list[float] = []
        fill = sampling_inputs.fill_token_bitmask

        def timed_fill(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = fill(*a, **k)
            fill_times.append(time.perf_counter() - t0)
            return out

        sampling_inputs.fill_token_bitmask = timed_fill  # instrumentation of this run only
        from fuselm.structured.compiler import GrammarCompiler

        batch_times: list[float] = []
        fill_batch = GrammarCompiler.fill_batch

        def timed_fill_batch(self: Any, *a: Any) -> Any:
            t0 = time.perf_counter()
            out = fill_batch(self, *a)
            batch_times.append(time.perf_counter() - t0)
            return out

        GrammarCompiler.fill_batch = timed_fill_batch  # type: ignore[method-assign]
        if args.content == "text":
            _text_like_head(llm)
        gen = torch.Generator().manual_seed(0)
        vocab = min(llm.tokenizer.vocab_size, llm.model_config.vocab_size)
        prompts = torch.randint(100, vocab, (args.batch_size, args.prompt_len),
                                generator=gen).tolist()
        free = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        constrained = SamplingParams(
            temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
            structured_outputs=StructuredOutputsParams(json=OPEN_SCHEMA))
        _timed_run(llm, prompts, free)  # warm-up: graphs, kernels
        _timed_run(llm, prompts, constrained)  # warm-up: tokenizer info, grammar compile
        fill_times.clear()
        batch_times.clear()
        rows = []
        run_ahead = llm.engine.run_ahead
        for label, params, ahead in (("free", free, run_ahead),
                                     ("free, sync", free, False),
                                     ("constrained", constrained, run_ahead),
                                     ("free again", free, run_ahead)):
            llm.engine.run_ahead = ahead  # a constrained batch never runs ahead: its baseline
            step_s, steps = _timed_run(llm, prompts, params)
            rows.append((label, step_s, steps))
        llm.engine.run_ahead = run_ahead
        sampling_inputs.fill_token_bitmask = fill
        GrammarCompiler.fill_batch = fill_batch  # type: ignore[method-assign]
    base = (rows[0][1] + rows[3][1]) / 2
    print(f"device {args.device}, shape {args.shape}, batch {args.batch_size}, "
          f"{args.max_tokens} tokens, vocab {llm.model_config.vocab_size}, "
          f"async scheduling {'on' if run_ahead else 'off'}")
    for label, step_s, steps in rows:
        print(f"{label:12s} step {step_s * 1e3:8.3f} ms over {steps} steps  "
              f"({step_s / base:.3f}x free, {step_s / rows[1][1]:.3f}x free sync)")
    mean_fill = statistics.mean(fill_times) * 1e3 if fill_times else 0.0
    if batch_times:
        print(f"of which xgrammar's batched fill: {statistics.mean(batch_times) * 1e3:.3f} ms "
              f"mean, {statistics.median(batch_times) * 1e3:.3f} ms median; the whole fill "
              f"{statistics.median(fill_times) * 1e3:.3f} ms median")
    print(f"mask fill on the host: {mean_fill:.3f} ms per step (mean of {len(fill_times)}); "
          f"mask applied on the device: {_apply_ms(args, llm.model_config.vocab_size):.3f} ms; "
          f"constrained / free = {rows[2][1] / base:.3f}, constrained / free sync = "
          f"{rows[2][1] / rows[1][1]:.3f}")


def _apply_ms(args: argparse.Namespace, vocab_size: int) -> float:
    """Device time of ``apply_token_bitmask`` on ``[batch, vocab]`` float32 logits."""
    from fuselm.layers.sampler import apply_token_bitmask

    device = torch.device(args.device)
    logits = torch.randn(args.batch_size, vocab_size, device=device)
    bitmask = torch.randint(-2**31, 2**31 - 1, (args.batch_size, -(-vocab_size // 32)),
                            dtype=torch.int32, device=device)
    for _ in range(3):
        apply_token_bitmask(logits, bitmask)
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(20):
            apply_token_bitmask(logits, bitmask)
        return (time.perf_counter() - t0) / 20 * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(100):
        apply_token_bitmask(logits, bitmask)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 100


def run_fill(args: argparse.Namespace) -> None:
    """The batched mask fill alone: --batch-size matchers inside an open JSON string (as in
    ``step``), one new token each per step, per --threads count."""
    import xgrammar as xgr

    hf = HFTokenizer.from_str(args.tokenizer_json.read_text())
    size = hf.get_vocab_size()
    vocab = [""] * size
    for token, token_id in hf.get_vocab(with_added_tokens=True).items():
        vocab[token_id] = token
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=size,
                             stop_token_ids=[size - 1])
    grammar = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(
        json.dumps(OPEN_SCHEMA))
    prefix = hf.encode('{"notes": ["abc', add_special_tokens=False).ids
    words = hf.encode(" the quick brown fox jumps over the lazy dog " * 4,
                      add_special_tokens=False).ids
    bitmask = xgr.allocate_token_bitmask(args.batch_size, size)
    for threads in args.threads:
        matchers = [xgr.GrammarMatcher(grammar) for _ in range(args.batch_size)]
        for m in matchers:
            for token in prefix:
                m.accept_token(token)
        batch = xgr.BatchGrammarMatcher(max_threads=threads)
        times = []
        for token in words:
            for m in matchers:
                m.accept_token(token)
            t0 = time.perf_counter()
            batch.batch_fill_next_token_bitmask(matchers, bitmask)
            times.append(time.perf_counter() - t0)
        print(f"vocab {size}, batch {args.batch_size}, {threads:2d} threads: fill "
              f"{statistics.median(times) * 1e3:.3f} ms median, "
              f"{statistics.mean(times) * 1e3:.3f} ms mean over {len(times)} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lib = sub.add_parser("libraries", help="xgrammar vs llguidance on the CPU")
    lib.add_argument("--threads", type=int, default=2)
    lib.add_argument("--batch-size", type=int, default=64)
    step = sub.add_parser("step", help="engine decode step with and without masks")
    step.add_argument("--shape", choices=["default", "llama-3-8b"], default="default")
    step.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    step.add_argument("--batch-size", type=int, default=64)
    step.add_argument("--max-tokens", type=int, default=128)
    step.add_argument("--prompt-len", type=int, default=64)
    step.add_argument("--content", choices=["random", "text"], default="random",
                      help="what the dummy model writes inside the constrained strings: "
                      "random tokens (the worst case for the mask), or lower-case ASCII "
                      "words (its head zeroed elsewhere; what a real model writes)")
    step.add_argument("--tokenizer-json", type=Path, default=None,
                      help="the 128k tokenizer of --shape llama-3-8b, written earlier by "
                      "`tokenizer --out FILE` (for a machine without the default model)")
    fill = sub.add_parser("fill", help="the batched mask fill alone, per thread count")
    fill.add_argument("--tokenizer-json", type=Path, required=True)
    fill.add_argument("--batch-size", type=int, default=64)
    fill.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    tok = sub.add_parser("tokenizer", help="write the 128k tokenizer of --shape llama-3-8b")
    tok.add_argument("--out", type=Path, required=True)
    tok.add_argument("--from-tiktoken", type=Path, default=None,
                     help="build it from this tiktoken ranks file (Llama 3's tokenizer.model) "
                     "instead of extending the default model's vocabulary")
    args = parser.parse_args()
    if args.command == "tokenizer":
        args.out.write_text(tiktoken_tokenizer(args.from_tiktoken) if args.from_tiktoken
                            else llama3_size_tokenizer())
        return
    {"libraries": run_libraries, "step": run_step, "fill": run_fill}[args.command](args)


if __name__ == "__main__":
    main()
