"""Micro-benchmark for the planner: the time one tiny kernel costs inside a CUDA graph.

Captures 1000 launches of a 1-element add in one graph and times replays with CUDA events.
Usage: python scripts/graph_kernel_gap.py
"""

import torch


def main() -> None:
    x = torch.zeros(1, device="cuda")
    n = 1000
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x.add_(1)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for _ in range(n):
            x.add_(1)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    print(f"kernel_gap_us {start.elapsed_time(end) * 1000 / (10 * n):.2f} "
          f"({torch.cuda.get_device_name()})")


if __name__ == "__main__":
    main()
