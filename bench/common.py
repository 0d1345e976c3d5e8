"""Shared pieces of the benchmark scripts (speed.py, memory.py, budget.py, crnn.py, cpu_speed.py).

* the FLOP formula, inputs and the padded-batch case;
* the methods compared, each a callable ``(q, k, v, case) -> out``: every effattn backend that
  can serve the call here (found through ``effattn.backends``, never assumed), the naive math,
  SDPA with each of its backends selected explicitly, FlexAttention (compiled), xformers if
  importable;
* ``Runtime``: the device, its timer (``triton.testing.do_bench`` on CUDA: median, L2 flushed;
  round-robin medians of repeated runs on the CPU) and its memory counters;
* the ``meta`` block every JSON carries, tables, plots, progress lines.

``EFFATTN_BENCH_FAKE_CUDA=1`` with ``--device cuda`` on a machine without a GPU runs the CUDA
code paths of the scripts (timing through a stand-in for ``do_bench``, memory counters read from
the process RSS, the memory cap checked after each trial) on CPU tensors. Its numbers mean nothing;
it exists so that the tests check the GPU-only logic on a CPU machine.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the checkout's effattn (built with setup.py build_ext --inplace)
try:
    import effattn  # noqa: E402
except ImportError as exc:  # pragma: no cover
    sys.exit(f"cannot import effattn ({exc}); build it first: python setup.py build_ext --inplace")

MiB, GiB = 2 ** 20, 2 ** 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
RESULTS = os.path.join(HERE, "results")


# ---------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------

def flops(B, H, L, S, E, causal=False, backward=False, mode=None):
    """4*B*H*L*S*E for the forward (QK^T and PV, 2 FLOPs per multiply-add), halved for causal;
    the backward is 2.5x the forward (five GEMMs of which one recomputes QK^T, against two).
    mode: "fwd", "bwd" or "fwd+bwd" (overrides ``backward``: True means forward+backward)."""
    f = 4 * B * H * L * S * E * (0.5 if causal else 1.0)
    if mode is None:
        mode = "fwd+bwd" if backward else "fwd"
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def padded_flops(lengths, H, E, mode="fwd"):
    """The useful work of a padded batch: sequence b attends its own lengths[b] queries to its
    lengths[b] keys (what effattn given key_lengths and query_lengths computes)."""
    return sum(flops(1, H, int(n), int(n), E, mode=mode) for n in lengths)


# ---------------------------------------------------------------------------
# Machine description, meta block, progress
# ---------------------------------------------------------------------------

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit():
    if os.environ.get("EFFATTN_COMMIT"):  # a copy of the tree without its git history (the GPU machine)
        return os.environ["EFFATTN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def versions():
    v = dict(torch=torch.__version__, python=platform.python_version(), effattn=effattn.__version__,
             cuda=torch.version.cuda)
    try:
        import triton
        v["triton"] = triton.__version__
    except Exception:
        v["triton"] = None
    try:
        import xformers
        v["xformers"] = xformers.__version__
    except Exception:
        pass
    return v


def meta(rt, script, argv):
    """The block every result file starts with: device, versions, commit, date, command line."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]  # a shared CPU machine: how busy it was at the start
    except OSError:
        load = None
    return dict(device=rt.kind, device_name=rt.name(), fake_cuda=rt.fake, threads=torch.get_num_threads(),
                load_average_at_start=load, cpu_count=os.cpu_count(),
                **versions(), effattn_commit=git_commit(), backends=str(effattn.backends()),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command=" ".join(["python3", f"bench/{script}"] + list(argv)))


def stamp(m):
    """One line for tables: device | versions | commit | date."""
    tri = f" | triton {m['triton']}" if m.get("triton") else ""
    return (f"{m['device_name']} | torch {m['torch']}{tri} | python {m['python']} | effattn {m['effattn']} "
            f"@ {m['effattn_commit']} | {m['date']}" + (" | FAKE CUDA (test mode)" if m.get("fake_cuda") else ""))


class Progress:
    """Progress lines ("[i/n] 12 s: ...") and a wall-clock budget for a sweep."""

    def __init__(self, total, max_seconds=None, prefix=""):
        self.total, self.i, self.t0 = total, 0, time.perf_counter()
        self.max_seconds, self.prefix = max_seconds, prefix

    def elapsed(self):
        return time.perf_counter() - self.t0

    def over_budget(self):
        return self.max_seconds is not None and self.elapsed() > self.max_seconds

    def step(self, msg):
        self.i += 1
        log(f"{self.prefix}[{self.i}/{self.total}] {self.elapsed():6.1f} s  {msg}")


def log(msg):
    print(msg, flush=True)


# ---------------------------------------------------------------------------
# Runtime: device, timer, memory counters
# ---------------------------------------------------------------------------

def proc_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_rss_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def medians_ms(fns, iters, warmup=1):
    """Median ms of each callable, timed round-robin (one run of each per round, after
    ``warmup`` rounds), so that every method sees the same machine conditions; a shared CPU
    machine drifts by 10-15% over minutes."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _fake_do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
    """Stand-in for triton.testing.do_bench with its signature (fake-CUDA test mode)."""
    assert return_mode == "median" and quantiles is None
    fn()
    ts = []
    for _ in range(3):
        for x in grad_to_none or ():
            x.grad = None
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


class Runtime:
    """The device a script measures on: "cpu" or "cuda" (or fake CUDA, see the module doc)."""

    def __init__(self, device="auto"):
        fake_env = os.environ.get("EFFATTN_BENCH_FAKE_CUDA") == "1"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise SystemExit(f"--device {device}: expected auto, cpu or cuda")
        self.kind = device
        self.fake = device == "cuda" and not torch.cuda.is_available() and fake_env
        if device == "cuda" and not torch.cuda.is_available() and not self.fake:
            raise SystemExit("--device cuda: torch sees no CUDA device here")
        self.device = torch.device("cpu" if (device == "cpu" or self.fake) else "cuda")
        self.cuda = self.kind == "cuda"
        self.cap_bytes = None
        self.rss = self.fake or not self.cuda  # memory counters from the process RSS
        self._rss0 = proc_kib("VmRSS") * 1024 if self.rss else 0
        if self.fake:
            self._do_bench = _fake_do_bench
        elif self.cuda:
            from triton.testing import do_bench
            self._do_bench = do_bench

    def name(self):
        if self.cuda and not self.fake:
            return torch.cuda.get_device_name(self.device)
        return f"{cpu_model()}, {torch.get_num_threads()} threads"

    def total_memory(self):
        if self.cuda and not self.fake:
            return torch.cuda.get_device_properties(self.device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def sync(self):
        if self.cuda and not self.fake:
            torch.cuda.synchronize(self.device)

    # -- timing
    def time_ms(self, fns, iters=5, warmup_ms=10, rep_ms=40, grad_to_none=None):
        """{name: median ms}. CUDA: triton.testing.do_bench per callable (median of runs within
        rep_ms, L2 flushed before each). CPU: round-robin medians of ``iters`` runs."""
        if self.cuda:
            return {n: float(self._do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                            return_mode="median")) for n, fn in fns.items()}
        return medians_ms(fns, iters)

    # -- memory (CUDA: the caching allocator's counters; CPU and fake CUDA: the process RSS,
    #    which in one process also holds what earlier runs freed, so it undercounts)
    def reset_peak(self):
        if self.rss:
            reset_rss_peak()
        elif self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self):
        if self.rss:
            return proc_kib("VmRSS") * 1024 - self._rss0
        return torch.cuda.memory_allocated(self.device)

    def peak(self):
        if self.rss:
            return proc_kib("VmHWM") * 1024 - self._rss0
        self.sync()
        return torch.cuda.max_memory_allocated(self.device)

    def set_cap(self, nbytes):
        """Cap this process's CUDA allocations at nbytes (set_per_process_memory_fraction)."""
        self.cap_bytes = nbytes
        if self.cuda and not self.fake:
            torch.cuda.set_per_process_memory_fraction(min(1.0, nbytes / self.total_memory()), torch.cuda.current_device())

    def cleanup(self):
        gc.collect()
        if self.cuda and not self.fake:
            torch.cuda.empty_cache()


def add_common_args(ap, max_seconds=None):
    ap.add_argument("--quick", action="store_true", help="tiny grid: a smoke run of seconds, not a timing "
                    "(writes *-quick.json)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default=RESULTS, help="output directory (default bench/results)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated method names or prefixes (e.g. effattn,sdpa:flash,naive); "
                         "default: all available")
    ap.add_argument("--max-seconds", type=float, default=max_seconds,
                    help="wall-clock budget: cells not reached are recorded as skipped")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


# ---------------------------------------------------------------------------
# Inputs and cases
# ---------------------------------------------------------------------------

def make_inputs(rt, B, H, L, E, dtype, S=None, seed=0):
    """q (B, H, L, E), k, v (B, H, S, E) requiring grad, and an upstream gradient dout."""
    S = L if S is None else S
    g = torch.Generator(device=rt.device).manual_seed(seed)
    shapes = [(B, H, L, E), (B, H, S, E), (B, H, S, E), (B, H, L, E)]
    ts = [torch.randn(s, generator=g, device=rt.device, dtype=dtype) for s in shapes]
    return [t.requires_grad_(i < 3) for i, t in enumerate(ts)]


def padded_case(B, L, device="cpu"):
    """Lengths: the first half of the batch full, the second half at L // 2. Returns (lengths,
    the dense key-padding mask SDPA needs, (B, 1, 1, S), True = attend)."""
    lengths = torch.tensor([L if b < (B + 1) // 2 else max(1, L // 2) for b in range(B)], device=device)
    key_mask = torch.arange(L, device=device)[None, :] < lengths[:, None]
    return lengths, key_mask[:, None, None, :]


def make_case(rt, kind, B, L, dout=None):
    """kind: "dense", "causal" or "padded". For padded batches the upstream gradient of the
    padding query rows is zeroed (their outputs are meaningless, and effattn given query_lengths
    returns zeros there), so every method's gradients mean the same."""
    case = dict(kind=kind, causal=kind == "causal", lengths=None, mask=None)
    if kind == "padded":
        case["lengths"], case["mask"] = padded_case(B, L, rt.device)
        if dout is not None:
            with torch.no_grad():
                dout.mul_(case["mask"][:, :, 0, :, None].to(dout.dtype))  # (B,1,L,1): row valid
    return case


def case_flops(case, B, H, L, E, mode):
    if case["kind"] == "padded":
        return padded_flops(case["lengths"].tolist(), H, E, mode)
    return flops(B, H, L, L, E, causal=case["causal"], mode=mode)


# ---------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------

class Unsupported(Exception):
    """The method cannot run this cell (the message says why)."""


def naive_attention(q, k, v, causal=False, mask=None):
    """What one writes by hand: softmax(q k^T / sqrt(E)) v with the whole (B, H, L, S) score
    matrix (autograd keeps it and the probabilities for the backward)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if causal:
        L, S = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class Method:
    """A way to compute attention.

    ``call(q, k, v, case, need_grad=True) -> out`` is complete (it enters ``context`` itself);
    ``raw`` is the same without the context, for timing loops that hold ``context()`` open
    around many calls (SDPA's sdpa_kernel selection) so that entering it is not timed."""

    def __init__(self, name, raw, family, note="", context=None):
        self.name, self.raw, self.family, self.note = name, raw, family, note
        self.context = context or contextlib.nullcontext

    def call(self, q, k, v, case, need_grad=True):
        with self.context():
            return self.raw(q, k, v, case, need_grad)

    def __repr__(self):
        return f"Method({self.name})"


def _effattn_kwargs(case):
    kw = dict(is_causal=case["causal"])
    if case["kind"] == "padded":  # lengths instead of a mask: effattn's way of saying it
        kw.update(key_lengths=case["lengths"], query_lengths=case["lengths"])
    return kw


def _effattn_method(backend):
    def call(q, k, v, case, need_grad=True):
        # effattn.attention raises if the backend cannot serve the call (classify_error: unsupported)
        return effattn.attention(q, k, v, backend=backend, **_effattn_kwargs(case))
    return Method(f"effattn:{backend}", call, "effattn",
                  "key_lengths + query_lengths for padded batches")


def effattn_backend_names(rt, dtype, include_materializing=False):
    """The effattn backends that can serve a plain call on this device and dtype, in
    effattn's priority order (read from effattn.backends, so new backends appear by themselves).
    The reference backend (materialises the scores, like naive) only when asked."""
    q = torch.zeros(1, 1, 16, 16, device=rt.device, dtype=dtype)
    usable = effattn.backends(q, q, q).usable()
    from effattn.backends import BY_NAME
    return [n for n in usable if include_materializing or not getattr(BY_NAME.get(n), "materializes_scores", False)]


SDPA_BACKENDS = [("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                 ("cudnn", "CUDNN_ATTENTION"), ("math", "MATH")]


def _sdpa_method(short, enum_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, enum_name)

    def call(q, k, v, case, need_grad=True):
        # under sdpa_kernel([backend]) (Method.context); the backward runs the kernel chosen here
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=case["mask"], is_causal=case["causal"])
        except RuntimeError as exc:
            if "No available kernel" in str(exc) or "No viable backend" in str(exc):
                raise Unsupported(str(exc).split("\n")[0]) from None  # validate() adds SDPA's warnings: why
            raise
    return Method(f"sdpa:{short}", call, "sdpa", "dense (B,1,1,S) bool key mask for padded batches",
                  context=lambda: sdpa_kernel([backend]))


_FLEX = {}


def _flex_method(rt):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    for name, value in (("recompile_limit", 256), ("cache_size_limit", 256)):
        if hasattr(torch._dynamo.config, name):  # one compile per shape until shapes go dynamic
            setattr(torch._dynamo.config, name, value)
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention)
    masks = {}

    def block_mask(case, B, L, S):
        if case["kind"] == "dense":
            return None
        key = (case["kind"], B, L, S, None if case["lengths"] is None else tuple(case["lengths"].tolist()))
        if key not in masks:
            if case["causal"]:
                def mod(b, h, qi, kv):
                    return qi >= kv
                masks[key] = create_block_mask(mod, None, None, L, S, device=str(rt.device))
            else:
                lengths = case["lengths"]

                def mod(b, h, qi, kv):  # the same information effattn gets: key and query lengths
                    return (kv < lengths[b]) & (qi < lengths[b])
                masks[key] = create_block_mask(mod, B, None, L, S, device=str(rt.device))
        return masks[key]

    def call(q, k, v, case, need_grad=True):
        if q.device.type == "cpu":
            if need_grad:
                raise Unsupported(f"FlexAttention has no CPU backward (torch {torch.__version__.split('+')[0]})")
            q, k, v = q.detach(), k.detach(), v.detach()
        bm = block_mask(case, q.shape[0], q.shape[-2], k.shape[-2])
        return _FLEX["fn"](q, k, v, block_mask=bm)
    return Method("flex", call, "flex", "torch.compile(flex_attention); block mask from key and query lengths")


def _xformers_method():
    import xformers.ops as xops

    def call(q, k, v, case, need_grad=True):
        if case["kind"] == "padded":
            raise Unsupported("padded batches need xformers' BlockDiagonalMask (packed varlen): not measured")
        bias = xops.LowerTriangularMask() if case["causal"] else None
        out = xops.memory_efficient_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_bias=bias)
        return out.transpose(1, 2)
    return Method("xformers", call, "xformers", "memory_efficient_attention, (B, L, H, E) views")


def all_methods(rt, dtype, include_flex=True):
    """Every method that exists here, in table order: effattn's backends, the naive math,
    SDPA's backends (CUDA: all four; CPU: flash and math), FlexAttention, xformers."""
    ms = [_effattn_method(b) for b in effattn_backend_names(rt, dtype)]
    ms.append(Method("naive", lambda q, k, v, case, need_grad=True: naive_attention(q, k, v, case["causal"], case["mask"]),
                     "naive", "softmax(q k^T) v, dense key mask for padded batches"))
    for short, enum_name in SDPA_BACKENDS:
        if rt.device.type == "cpu" and short in ("efficient", "cudnn"):
            continue  # CUDA-only kernels (recorded as not available here)
        ms.append(_sdpa_method(short, enum_name))
    if include_flex:
        try:
            ms.append(_flex_method(rt))
        except Exception as exc:
            log(f"FlexAttention not available: {exc}")
    if rt.cuda and not rt.fake:
        try:
            ms.append(_xformers_method())
        except ImportError:
            pass
    return ms


def select_methods(methods, spec):
    """Filter by --methods: names or prefixes ("effattn" matches every effattn backend)."""
    if not spec:
        return methods
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    keep = [m for m in methods if any(m.name == w or m.name.startswith(w + ":") or m.family == w for w in wanted)]
    unknown = [w for w in wanted if not any(m.name == w or m.name.startswith(w + ":") or m.family == w
                                            for m in methods)]
    if unknown:
        log(f"--methods: not available here: {', '.join(unknown)} (have: {', '.join(m.name for m in methods)})")
    return keep


def classify_error(exc):
    """A cell's failure as a short record: "OOM", "unsupported: why" or "error: what"."""
    if isinstance(exc, Unsupported):
        return f"unsupported: {exc}"
    text = str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower() \
            or "can't allocate memory" in text.lower():
        return "OOM"
    if "cannot serve this call" in text:  # effattn.attention with a backend that declares it cannot
        return "unsupported: " + text.split("cannot serve this call:", 1)[-1].strip()[:200]
    if isinstance(exc, NotImplementedError):
        return "unsupported: " + text.split("\n")[0][:200]
    return f"error: {type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


# ---------------------------------------------------------------------------
# Validation (before timing)
# ---------------------------------------------------------------------------

TOL = {torch.float32: 2e-3, torch.float64: 1e-8, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def validate(rt, method, kind, E, dtype, B=2, H=2, L=256, grads=True):
    """Max error of the output (and q/k/v gradients) against float64 math at a small size,
    relative to the reference's largest magnitude. Returns (ok, error, status)."""
    q, k, v, dout = make_inputs(rt, B, H, L, E, dtype, seed=1)
    case = make_case(rt, kind, B, L, dout)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = method.call(q, k, v, case, need_grad=grads)
            except Unsupported as exc:  # SDPA says why a kernel was not used in warnings
                why = [str(w.message).split("\n")[0] for w in caught if "used because" in str(w.message)]
                raise Unsupported("; ".join([str(exc)] + why[:2])) from None
        got = [out]
        if grads:
            got += list(torch.autograd.grad(out, (q, k, v), dout))
    except Exception as exc:  # noqa: BLE001  (recorded per cell)
        if grads and isinstance(exc, Unsupported):  # e.g. forward-only: check the forward at least
            try:
                ok, err, _ = validate(rt, method, kind, E, dtype, B, H, L, grads=False)
                return ok, err, f"forward only ({exc})"
            except Exception:
                pass
        rt.cleanup()
        return False, None, classify_error(exc)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = naive_attention(q64, k64, v64, case["causal"], case["mask"])
    want = [ref]
    if grads:
        want += list(torch.autograd.grad(ref, (q64, k64, v64), dout.double()))
    rows = None
    if case["kind"] == "padded":  # padding query rows: undefined output; compare the valid ones
        rows = case["mask"][:, :, 0, :, None]
    err = 0.0
    for i, (a, b) in enumerate(zip(got, want)):
        a = a.double()
        if i == 0 and rows is not None:
            a, b = a * rows, b * rows
        err = max(err, ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item())
    ok = err <= TOL[dtype] and math.isfinite(err)
    return ok, err, "ok" if ok else f"invalid: relative error {err:.2e} > {TOL[dtype]:.0e}"


# ---------------------------------------------------------------------------
# Output: JSON, tables, plots
# ---------------------------------------------------------------------------

def out_path(args, stem, device_kind, ext="json"):
    os.makedirs(args.out, exist_ok=True)
    return os.path.join(args.out, f"{stem}-{device_kind}{'-quick' if args.quick else ''}.{ext}")


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    log(f"wrote {os.path.relpath(path)}")


def table(headers, rows, markdown=False):
    """Rows of strings -> an aligned text table, or a markdown one."""
    rows = [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    fmt = lambda r: "  ".join(s.rjust(w) if i else s.ljust(w) for i, (s, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt([str(h) for h in headers]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def write_markdown(path, title, m, sections):
    """sections: list of (heading, markdown table text)."""
    text = [f"# {title}", "", stamp(m), "", f"`{m['command']}`", ""]
    for heading, body in sections:
        text += [f"## {heading}", "", body, ""]
    with open(path, "w") as f:
        f.write("\n".join(text))
    log(f"wrote {os.path.relpath(path)}")


def plot(path, draw):
    """draw(plt) makes the figure; skipped with a message if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"matplotlib is not installed: no plot ({os.path.basename(path)})")
        return None
    try:
        draw(plt)
        plt.savefig(path, dpi=110, bbox_inches="tight")
        log(f"wrote {os.path.relpath(path)}")
        return path
    finally:
        plt.close("all")


def write_results(path, script, m, res, tables, draw):
    """A script's outputs: JSON at path, the markdown tables and the plot beside it, then
    the text tables on stdout. tables(res, markdown=...) -> [(title, text)]; draw(res) -> a
    function of plt."""
    write_json(path, res)
    write_markdown(path[:-5] + ".md", script, m, tables(res, markdown=True))
    plot(path[:-5] + ".png", draw(res))
    print()
    for title, text in tables(res):
        print(title)
        print(text)
        print()


def fmt_ms(x):
    return f"{x:.2f}" if isinstance(x, (int, float)) and x < 10 else (f"{x:.1f}" if isinstance(x, (int, float)) else str(x))


def short(status):
    """A cell status for a narrow table column."""
    s = str(status)
    if s.startswith("unsupported"):
        return "unsup."
    if s.startswith("skipped"):
        return "skip"
    if s.startswith("invalid"):
        return "invalid"
    if s.startswith("error"):
        return "error"
    return s
