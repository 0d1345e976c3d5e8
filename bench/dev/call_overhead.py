"""Per-call overhead of effattn.attention on a tiny CPU input (1 x 1 x 4 x 16,
one thread), where Python dispatch dominates: forward, forward with inputs
that require grad, and forward+backward; best of 5 runs, microseconds.

    python3 bench/dev/call_overhead.py LABEL [PATH]

PATH puts another checkout first on sys.path (with its built extension), so
two versions can be compared on the same machine, alternating runs.
"""
import sys
import time

if len(sys.argv) > 2:
    sys.path.insert(0, sys.argv[2])

import torch  # noqa: E402

import effattn  # noqa: E402


def best_of(f, n=3000, runs=5):
    for _ in range(300):
        f()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main():
    torch.set_num_threads(1)
    q = torch.randn(1, 1, 4, 16)
    qg = q.clone().requires_grad_()

    def fwd_bwd():
        effattn.attention(qg, qg, qg).sum().backward()

    print(f"{sys.argv[1] if len(sys.argv) > 1 else effattn.__file__}: "
          f"forward {best_of(lambda: effattn.attention(q, q, q)):.1f} us | "
          f"forward, inputs requiring grad {best_of(lambda: effattn.attention(qg, qg, qg), 2000):.1f} | "
          f"forward+backward {best_of(fwd_bwd, 1000):.1f}")


if __name__ == "__main__":
    main()
