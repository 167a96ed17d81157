"""Decode speed of the default model on this CPU: fuselm beside transformers, same prompt, same run.

Per-token time excludes load and prefill: (end - first token) / (tokens - 1), after a warm-up,
median of 3 runs each. Usage: python scripts/cpu_decode_speed.py [--tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PROMPT = "What is the capital of France? Answer in one long paragraph."


def fuselm_ms_per_token(num_tokens: int, runs: int) -> tuple[float, list[int]]:
    from fuselm import LLM, SamplingParams

    llm = LLM(device="cpu", max_model_len=2048, cpu_kv_cache_gib=0.25)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    llm.generate([prompt], params)  # warm-up
    times, tokens = [], []
    for _ in range(runs):
        out = llm.generate([prompt], params)[0]
        m = out.metrics
        times.append(1000 * (m["finished_time"] - m["first_token_time"]) / (num_tokens - 1))
        tokens = out.outputs[0].token_ids
    return statistics.median(times), tokens


@torch.inference_mode()
def hf_ms_per_token(num_tokens: int, runs: int) -> tuple[float, list[int]]:
    import transformers

    from fuselm.loading.default_model import default_model_path

    path = default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text)])

    def run() -> tuple[float, list[int]]:
        out = model(ids, use_cache=True)
        token = out.logits[0, -1].argmax()
        generated = [int(token)]
        start = time.perf_counter()
        for _ in range(num_tokens - 1):
            out = model(token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[0, -1].argmax()
            generated.append(int(token))
        return 1000 * (time.perf_counter() - start) / (num_tokens - 1), generated

    run()  # warm-up
    results = [run() for _ in range(runs)]
    return statistics.median(r[0] for r in results), results[-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours, our_tokens = fuselm_ms_per_token(args.tokens, args.runs)
    theirs, their_tokens = hf_ms_per_token(args.tokens, args.runs)
    print(f"threads={args.threads} tokens={args.tokens} median of {args.runs}")
    print(f"fuselm       {ours:7.2f} ms/token")
    print(f"transformers {theirs:7.2f} ms/token")
    print(f"speed-up     {theirs / ours:7.2f}x; same greedy tokens: {our_tokens == their_tokens}")


if __name__ == "__main__":
    main()
