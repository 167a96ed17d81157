"""Micro-benchmark for the planner: the time one tiny kernel costs inside a CUDA graph.

Captures 1000 launches of a 1-element add in one graph and times replays with CUDA events.
Usage: python scripts/graph_kernel_gap.py
"""

import torch

from fuselm.bench.common import graph_time_us


def main() -> None:
    x = torch.zeros(1, device="cuda")
    n = 1000

    def launches() -> None:
        for _ in range(n):
            x.add_(1)

    print(f"kernel_gap_us {graph_time_us(launches, n, replays=10):.2f} "
          f"({torch.cuda.get_device_name()})")


if __name__ == "__main__":
    main()
