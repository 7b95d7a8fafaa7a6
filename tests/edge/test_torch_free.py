"""The device side installs and runs without torch, timm or onnx (the [edge] extra).

Each import runs in a fresh interpreter with those packages blocked (`sys.modules[name] =
None` makes any `import torch` raise ImportError), so a stray top-level import anywhere in
the module's import chain fails here, not on a Raspberry Pi.
"""
from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "timm", "onnx")
BLOCK = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in HEAVY)

# What a Pi runs: the head runner, preprocessing, the token codec, the client (`infer`), and
# `bench --device pi` (bench, the network model, device profiles, the planner).
DEVICE_MODULES = [
    "mercury_onnx.formats.manifest",
    "mercury_onnx.runtime.head",
    "mercury_onnx.formats.images",
    "mercury_onnx.runtime.codec",
    "mercury_onnx.runtime.client",
    "mercury_onnx.runtime.bench",
    "mercury_onnx.runtime.bench_setup",
    "mercury_onnx.runtime.bench_sim",
    "mercury_onnx.runtime.network",
    "mercury_onnx.runtime.profiles",
    "mercury_onnx.runtime.planner",
    "mercury_onnx.cli",
]


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def blocked_imports() -> dict:
    """{module: "ok" | the import error}, every module imported in one torch-blocked interpreter
    (one interpreter start instead of ten: onnxruntime's import alone takes seconds)."""
    r = run_blocked(
        "import importlib, json, traceback\nresult = {}\n"
        f"for m in {DEVICE_MODULES!r}:\n"
        "    try:\n        importlib.import_module(m); result[m] = 'ok'\n"
        "    except Exception:\n        result[m] = traceback.format_exc(limit=-3)\n"
        "print(json.dumps(result))")
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", DEVICE_MODULES)
def test_device_module_imports_without_torch(module, blocked_imports):
    assert importlib.util.find_spec(module) is not None, f"{module} is gone: update DEVICE_MODULES"
    assert blocked_imports[module] == "ok", f"{module} needs torch/timm/onnx at import time:\n{blocked_imports[module]}"


def test_blocking_really_blocks_torch():
    # The harness itself: with the block in place `import torch` must fail.
    r = run_blocked("import torch")
    assert r.returncode != 0 and "import of torch halted" in r.stderr, r.stderr


def test_export_command_without_torch_says_install_the_extra():
    r = run_blocked("sys.argv = ['mercury-onnx', 'info', '--model', 'deit_tiny_patch16_224']\n"
                    "from mercury_onnx.cli import main\nmain()")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "error: `mercury-onnx info` needs torch, timm, onnx" in r.stderr
    assert "pip install 'mercury-onnx[export]'" in r.stderr


def cli_blocked(*args) -> str:
    return BLOCK + f"sys.argv = ['mercury-onnx', *{[str(a) for a in args]!r}]\nfrom mercury_onnx.cli import main\nmain()"


def test_split_inference_without_torch(ref_export, cifar_test, tmp_path):
    # serve-tail and infer, both with torch blocked: head, preprocessing, codec, client and
    # server all run on the [edge]/[cloud] stacks alone. --fallback none: the split must work.
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-c", cli_blocked("serve-tail", ref_export, "--port", port)],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(120):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            subprocess.run(["sleep", "0.5"])
        image = sorted((cifar_test / "cat").glob("*.jpg"))[0]
        for dtype in ("fp32", "int8"):
            r = subprocess.run([sys.executable, "-c", cli_blocked(
                "infer", "--export", ref_export, "--server", f"http://127.0.0.1:{port}", "--fallback", "none",
                "--token-dtype", dtype, "--threads", "4", image)], cwd=ROOT, capture_output=True, text=True,
                timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "cat" in r.stdout and "%" in r.stdout and "fallback" not in r.stdout, r.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_bench_device_pi_without_torch(ref_export, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-c", cli_blocked("bench", ref_export, "--device", "pi", "--requests", "20",
                                                          "--jpeg-images", "4", "--json", out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "mercury" in r.stdout and json.loads(out.read_text())


def test_edge_extra_has_no_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["edge"]
    names = {r.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip().lower()
             for r in reqs}
    assert "onnxruntime" in names and "numpy" in names
    assert not names & {"torch", "torchvision", "timm", "onnx", "onnxsim", "onnxscript"}, names
    assert any(r.replace(" ", "").startswith("onnxruntime") and "!=1.21.0" in r.replace(" ", "")
               for r in reqs), "onnxruntime 1.21.0 crashes on a Pi 4 (Cortex-A72): keep it excluded"


@pytest.mark.slow
def test_pip_resolves_edge_extra_without_torch(tmp_path, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow (about a minute of pip resolution against the index): run with -m slow; "
                    "tools/arm64_check.sh resolves the same extra for aarch64")
    # A real resolution against the index, in a fresh venv: what `pip install '.[edge]'` would install.
    venv.create(tmp_path / "venv", with_pip=True)
    pip = tmp_path / "venv" / "bin" / "pip"
    report = tmp_path / "report.json"
    r = subprocess.run([str(pip), "install", "-q", "--dry-run", "--report", str(report), f"{ROOT}[edge]"],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("Could not fetch" in r.stderr or "NewConnectionError" in r.stderr):
        pytest.skip(f"no package index reachable: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert {"mercury-onnx", "onnxruntime", "numpy", "pillow", "httpx", "typer"} <= names, names
    assert not names & {"torch", "torchvision", "timm", "onnx"}, names
