"""The shipped artefact: one cp39-abi3 wheel, built on the stable ABI, that runs on another torch.

Builds the wheel from a clean copy of this checkout against the torch installed here, checks its
tag and that _C.abi3.so uses none of libtorch's C++ symbols, then installs it into a clean venv
holding a different torch (2.13.0, CPU build) and checks the results there against the reference
and SDPA.

The venv (torch only) is cached across runs in the temp dir, keyed by torch and Python version;
the wheel itself is installed afresh each run into a per-run --target directory.
"""
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import run_checked as run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
OTHER_TORCH = "2.13.0"  # a torch >= 2.10 other than the one we build against


# ---- the wheel --------------------------------------------------------------------------------

# Build outputs left in the checkout: a wheel must not depend on them (pip builds in-tree, and
# setuptools would package stale files from build/) nor race with a concurrent build there.
NOT_SOURCES = shutil.ignore_patterns(".git", "build", "build-cmake", "cmake-build*", "dist",
                                     "*.egg-info", "__pycache__", ".pytest_cache", "*.so", "*.whl",
                                     ".venv*")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src, out = tmp_path_factory.mktemp("src") / "effattn", tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, src, ignore=NOT_SOURCES)
    # CPU part only: the venv below has a CPU-only torch, where a _C linked to libtorch_cuda
    # could not load.
    env = dict(os.environ, EFFATTN_CPU_ONLY="1")
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
         "-w", out, src], env=env)
    wheels = sorted(out.glob("effattn-*.whl"))
    assert len(wheels) == 1, f"expected one effattn wheel, got {[w.name for w in wheels]}"
    return wheels[0]


def test_wheel_is_abi3(wheel):
    # One wheel for every CPython >= 3.9: the limited API (abi3), not a cp311-only build.
    assert "-cp39-abi3-" in wheel.name, wheel.name


@pytest.fixture(scope="module")
def extension(wheel, tmp_path_factory) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if re.fullmatch(r"effattn/_C\.abi3\.so", n)]
        assert names, f"no effattn/_C.abi3.so in {wheel.name}: {zf.namelist()}"
        return Path(zf.extract(names[0], tmp_path_factory.mktemp("unzipped")))


def binutils(name: str) -> str:
    if shutil.which(name) is None:
        pytest.fail(f"{name} (binutils) is needed to inspect the extension")
    return name


def dynamic_symbols(so: Path, which: str):
    """Demangled dynamic symbols of `so`; which: "--undefined-only" or "--defined-only"."""
    out = run([binutils("nm"), "-D", "-C", which, so]).stdout
    # nm prints "[address] type name"; the name may contain spaces once demangled.
    return [re.sub(r"^\s*([0-9a-f]+\s+)?\S\s+", "", line)
            for line in out.splitlines() if line.strip()]


# A symbol in one of libtorch's C++ namespaces; demangled, so std::vector<at::Tensor> counts too.
CPP_TORCH = re.compile(r"(?<![\w:])(at|c10|torch)::")
# The stable headers (torch/csrc/stable, torch/headeronly) are header-only: their inline code may
# be emitted into the extension itself (defined there), which ties it to no libtorch version.
HEADER_ONLY = re.compile(r"(?<![\w:])torch::(stable|headeronly)::")


def test_extension_uses_only_the_stable_c_abi(extension):
    undefined = dynamic_symbols(extension, "--undefined-only")
    defined = dynamic_symbols(extension, "--defined-only")

    # Everything taken from libtorch comes through its C shim (extern "C": aoti_torch_*, torch_*).
    # A mangled at::/c10::/torch:: import would bind to one libtorch's C++ ABI.
    assert any(s.startswith("aoti_torch_") for s in undefined), \
        f"no aoti_torch_* import at all: is this the effattn extension?\n{undefined}"
    cpp_imports = [s for s in undefined if CPP_TORCH.search(s)]
    assert not cpp_imports, "libtorch C++ imports (unstable ABI):\n" + "\n".join(cpp_imports)

    # Nothing of at::/c10:: may be compiled in either (that would mean ATen headers were used);
    # torch::stable / torch::headeronly inline code is fine.
    cpp_defined = [s for s in defined if CPP_TORCH.search(s) and not HEADER_ONLY.search(s)]
    assert not cpp_defined, "libtorch C++ code compiled in:\n" + "\n".join(cpp_defined)

    # No libtorch_python or libpython: each is tied to one torch or one CPython.
    needed = re.findall(r"\(NEEDED\).*\[(.*)\]", run([binutils("readelf"), "-d", extension]).stdout)
    assert "libtorch_cpu.so" in needed, needed
    assert not [lib for lib in needed if lib.startswith(("libtorch_python", "libpython"))], needed


# ---- a clean venv with another torch ----------------------------------------------------------

@pytest.fixture(scope="module")
def other_torch_python() -> Path:
    """Python of a clean venv (no system site-packages) holding only torch==OTHER_TORCH."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    root = Path(tempfile.gettempdir()) / f"effattn-venv-torch{OTHER_TORCH}-py{py}"
    python, done = root / "bin" / "python", root / "torch-installed"
    with open(f"{root}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one creator at a time; the others then reuse it
        if done.exists():
            return python
        shutil.rmtree(root, ignore_errors=True)
        run([sys.executable, "-m", "venv", root])
        proc = subprocess.run([python, "-m", "pip", "install", "-q", f"torch=={OTHER_TORCH}"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            if "No matching distribution found" in proc.stderr:
                pytest.skip(f"torch=={OTHER_TORCH} cannot be installed here (no index or local "
                            f"wheel has it for Python {py}):\n{proc.stderr[-2000:]}")
            pytest.fail(f"pip install torch=={OTHER_TORCH} failed:\n{proc.stderr[-6000:]}")
        done.write_text(OTHER_TORCH + "\n")
    return python


SMOKE = textwrap.dedent("""
    import sys
    import torch
    import torch.nn.functional as F
    import effattn

    print("torch", torch.__version__, "| python", sys.version.split()[0],
          "| effattn", effattn.__file__)
    assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
    assert effattn.__file__.startswith(sys.argv[2]), "effattn was not imported from the wheel"

    torch.manual_seed(0)
    B, H, L, S, E = 2, 3, 37, 45, 40
    for is_causal in (False, True):
        q, k, v = (torch.randn(B, H, n, E, requires_grad=True) for n in (L, S, S))
        dout = torch.randn(B, H, L, E)

        def fwd_bwd(fn, *args, **kwargs):
            out = fn(*args, is_causal=is_causal, **kwargs)
            grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
            return [out.detach().float()] + [g.float() for g in grads]

        got = fwd_bwd(effattn.attention, q, k, v, backend="cpu")
        oracle = fwd_bwd(effattn.reference.attention, q, k, v, compute_dtype=torch.float64)
        sdpa = fwd_bwd(F.scaled_dot_product_attention, q, k, v)
        for name, g, o, s in zip(("out", "dq", "dk", "dv"), got, oracle, sdpa):
            err, sdpa_err = (g - o).abs().max().item(), (s - o).abs().max().item()
            print(f"is_causal={is_causal} {name}: max err vs float64 reference {err:.2e} "
                  f"(SDPA's {sdpa_err:.2e}), vs SDPA {(g - s).abs().max().item():.2e}")
            torch.testing.assert_close(g, o, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(g, s, atol=1e-4, rtol=1e-4)
    print("ok")
""")


def test_wheel_runs_on_other_torch(wheel, other_torch_python, tmp_path):
    site = tmp_path / "site"
    run([other_torch_python, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel])
    (tmp_path / "smoke.py").write_text(SMOKE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    proc = run([other_torch_python, "smoke.py", OTHER_TORCH, site], cwd=tmp_path, env=env)
    print(proc.stdout)
    assert proc.stdout.rstrip().endswith("ok")
