#!/usr/bin/env python3
"""Per-call host cost of effattn.attention on tiny inputs, against SDPA in the same process.

    python3 bench/overhead.py                       # this checkout; writes bench/results/overhead-cpu.{json,md}
    python3 bench/overhead.py --compare /path/tree  # and another checkout (built in place), runs alternated

Where Python and dispatch dominate (q = k = v of shape (1, 1, 8, 16), float32, one thread):

* cpu: effattn.attention and torch.nn.functional.scaled_dot_product_attention, in three
  modes: no_grad, forward with inputs that require grad, and forward + backward of .sum();
* cuda host path (on this CPU machine, no GPU): the dispatch code as it runs for CUDA tensors
  (tests/dispatch_as_cuda.py's stand-ins: the spec reports cuda:0, the driver answers as an
  H100): make_spec + select (bf16 -> triton), and the whole effattn.attention call on the triton
  backend with its kernel launches replaced by no-ops (spec, selection, the op layer, the Triton
  op's launch preparation: configs, grids, allocations). The launches and the CUDA C++ host code
  are not in it.

Each figure is the best (lowest) of several timed loops in a fresh child process, and the
smallest over --rounds children; checkouts (with --compare) take turns child by child, so drift
of the shared machine hits both alike. Times in microseconds; ratios are effattn / SDPA in the
same child. Not a test: nothing here asserts a speed.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODES = ("no_grad", "grad", "fwd_bwd")


def best_us(fn, n, runs=7, warmup=200):
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def child_cpu(n):
    import torch
    import torch.nn.functional as F
    import effattn
    torch.set_num_threads(1)
    q = torch.randn(1, 1, 8, 16)
    qg = q.clone().requires_grad_()
    calls = {
        "effattn": {"no_grad": lambda: effattn.attention(q, q, q), "grad": lambda: effattn.attention(qg, qg, qg),
                    "fwd_bwd": lambda: effattn.attention(qg, qg, qg).sum().backward()},
        "sdpa": {"no_grad": lambda: F.scaled_dot_product_attention(q, q, q),
                 "grad": lambda: F.scaled_dot_product_attention(qg, qg, qg),
                 "fwd_bwd": lambda: F.scaled_dot_product_attention(qg, qg, qg).sum().backward()},
    }
    out = {}
    for mode in MODES:  # the two methods of a mode back to back
        for method in ("effattn", "sdpa"):
            out[f"{method} {mode}"] = best_us(calls[method][mode], n if mode != "fwd_bwd" else n // 4)
    return out


def child_cuda_host(n):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import dispatch_as_cuda  # noqa: F401  (the stand-ins: spec on cuda:0, the driver as an H100)
    import torch
    import effattn
    from effattn import spec as spec_module
    from effattn.backends import select
    torch.set_num_threads(1)
    q = torch.randn(1, 1, 8, 64, dtype=torch.bfloat16)
    out = {"make_spec + select": best_us(lambda: select(spec_module.make_spec(q, q, q, is_causal=True)), n)}
    try:
        from effattn.triton import ops as triton_ops
    except ImportError:
        return out

    class NoLaunch:  # wrap_triton(kernel)[grid](*args, **meta): nothing runs
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    triton_ops.wrap_triton = lambda kernel: NoLaunch()
    out["attention, triton, launches stubbed"] = best_us(
        lambda: effattn.attention(q, q, q, is_causal=True, backend="triton"), n)
    return out


def run_child(checkout, part, n):
    env = dict(os.environ, PYTHONPATH=checkout, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", part, "--n", str(n)],
                          cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{checkout} {part}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compare", help="another checkout (effattn built in place) to measure alternately")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=2000, help="calls per timed loop")
    ap.add_argument("--quick", action="store_true", help="a smoke run (CI): checks the script, not the speed")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--child", choices=("cpu", "cuda_host"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child_cpu(a.n) if a.child == "cpu" else child_cuda_host(a.n)))
        return
    if a.quick:
        a.rounds, a.n = 1, 40
    trees = {"this": ROOT}
    if a.compare:
        trees["compare"] = os.path.abspath(a.compare)
    best = {name: {} for name in trees}
    for r in range(a.rounds):
        for name, tree in trees.items():
            for part in ("cpu", "cuda_host"):
                for key, us in run_child(tree, part, a.n).items():
                    best[name][key] = min(us, best[name].get(key, float("inf")))
        print(f"round {r + 1}/{a.rounds}: " + json.dumps({k: round(v, 1) for k, v in best["this"].items()}), flush=True)

    sys.path.insert(0, HERE)
    from common import cpu_model, git_commit, versions  # noqa: E402
    import torch
    rows = []
    for name, res in best.items():
        for mode in MODES:
            e, s = res[f"effattn {mode}"], res[f"sdpa {mode}"]
            rows.append(dict(checkout=name, tree=trees[name], mode=mode, effattn_us=round(e, 2), sdpa_us=round(s, 2),
                             ratio=round(e / s, 3)))
    host = [dict(checkout=name, tree=trees[name], what=k, us=round(v, 2)) for name, res in best.items()
            for k, v in res.items() if not k.startswith(("effattn ", "sdpa "))]
    meta = dict(cpu=cpu_model(), threads=1, **versions(), effattn_commit=git_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                load_average_at_start=[round(x, 2) for x in os.getloadavg()], rounds=a.rounds, n=a.n,
                command=" ".join(["python3", "bench/overhead.py"] + sys.argv[1:]))
    res = dict(meta=meta, cpu=rows, cuda_host=host)
    stem = os.path.join(a.out, "overhead-cpu" + ("-quick" if a.quick else ""))
    os.makedirs(a.out, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Per-call host cost, tiny inputs (1, 1, 8, 16) float32, one thread", "",
             f"{meta['cpu']} | torch {torch.__version__} | effattn @ {meta['effattn_commit']} | {meta['date']} | "
             f"load at start {meta['load_average_at_start']}", "", f"`{meta['command']}`", "",
             "Best of 7 loops of the calls, smallest over the rounds (fresh processes; checkouts alternated).", "",
             "| checkout | mode | effattn us | SDPA us | effattn / SDPA |", "|---|---|---|---|---|"]
    lines += [f"| {r['checkout']} | {r['mode']} | {r['effattn_us']} | {r['sdpa_us']} | {r['ratio']}x |" for r in rows]
    lines += ["", "CUDA host path on the CPU (stand-ins for the driver; launches stubbed):", "",
              "| checkout | what | us |", "|---|---|---|"]
    lines += [f"| {h['checkout']} | {h['what']} | {h['us']} |" for h in host]
    lines += ["", "Trees: " + ", ".join(f"{k} = {v}" for k, v in trees.items()), ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
