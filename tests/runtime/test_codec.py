"""Token payload: round trips (fp16, int8 + scales, fp32; int16/int32 indices) and every
malformed payload rejected with a CodecError that says what is wrong."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mercury_onnx.runtime import codec

MID = "0123456789abcdef"


def _sample(b=2, k=16, d=192, n=64, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((b, 1 + k, d)).astype(np.float32) * 3
    indices = np.sort(np.stack([rng.choice(n, k, replace=False) for _ in range(b)]), 1).astype(np.int64)
    return tokens, indices


@pytest.mark.parametrize("dtype,tol", [("fp32", 0), ("fp16", 2e-3), ("int8", 1 / 127)])
def test_round_trip(dtype, tol):
    tokens, indices = _sample()
    data = codec.encode(tokens, indices, model_id=MID, keep_ratio=0.25, num_patches=64, token_dtype=dtype)
    h, t, i = codec.decode(data, expect_model_id=MID)
    assert (h.token_dtype, h.index_dtype, h.batch, h.keep, h.dim, h.num_patches) == (dtype, "int16", 2, 16, 192, 64)
    assert h.model_id == MID and abs(h.keep_ratio - 0.25) < 1e-7
    np.testing.assert_array_equal(i, indices)
    assert i.dtype == np.int64 and t.dtype == np.float32
    # fp16: relative error; int8: at most half a quantisation step of each token's max
    bound = tol * np.abs(tokens).max(-1, keepdims=True) if dtype == "int8" else tol * np.abs(tokens) + 1e-6
    assert (np.abs(t - tokens) <= bound + 1e-6).all()
    itemsize = {"fp32": 4, "fp16": 2, "int8": 1}[dtype]
    assert len(data) == codec.HEADER_SIZE + 2 * 17 * 192 * itemsize + 2 * 16 * 2 + (2 * 17 * 4 if dtype == "int8" else 0)


def test_int32_indices_for_large_grids():
    tokens, indices = _sample(b=1, k=4, d=8, n=40000)
    indices = np.array([[3, 100, 33000, 39999]])
    data = codec.encode(tokens, indices, model_id=MID, keep_ratio=0.1, num_patches=40000)
    h, _, i = codec.decode(data)
    assert h.index_dtype == "int32" and (i == indices).all()


def test_tok8_head_output_passes_through():
    tokens, indices = _sample()
    q, s = codec.quantize_int8(tokens)
    data = codec.encode(q, indices, model_id=MID, keep_ratio=0.25, num_patches=64, token_dtype="int8", scales=s)
    _, p = codec.decode_packed(data)
    assert (p.tokens == q).all() and (p.scales == s).all()


def _bad(data: bytes, match: str, **kw):
    with pytest.raises(codec.CodecError, match=match):
        codec.decode(data, **kw)


def test_malformed_payloads_are_rejected():
    tokens, indices = _sample()
    data = codec.encode(tokens, indices, model_id=MID, keep_ratio=0.25, num_patches=64, token_dtype="int8")
    _bad(data[:10], "truncated")
    _bad(data[:-1], "truncated")
    _bad(data + b"\0", "trailing")
    _bad(b"XXXX" + data[4:], "bad magic")
    _bad(data[:4] + bytes([9]) + data[5:], "version")
    _bad(data[:5] + bytes([7]) + data[6:], "token dtype")
    _bad(data, "different exports", expect_model_id="f" * 16)
    bad_idx = indices.copy()
    bad_idx[0, 1] = bad_idx[0, 0]
    _bad(codec.encode(tokens, bad_idx, model_id=MID, keep_ratio=0.25, num_patches=64), "strictly ascending")
    bad_idx[0, 1] = 64
    bad_idx[0].sort()
    _bad(codec.encode(tokens, bad_idx, model_id=MID, keep_ratio=0.25, num_patches=64), "out of range")
    with pytest.raises(codec.CodecError, match="16 hex"):
        codec.encode(tokens, indices, model_id="nope", keep_ratio=0.25, num_patches=64)
    with pytest.raises(codec.CodecError, match="not \\(B, P\\+K, D\\)"):
        codec.encode(tokens[:, :5], indices, model_id=MID, keep_ratio=0.25, num_patches=64)


@pytest.mark.parametrize("prefix", [0, 2, 5])
@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_prefix_tokens_round_trip_as_version_2(prefix, dtype):
    """A distilled DeiT sends CLS + distillation token (P = 2), register ViTs more."""
    rng = np.random.default_rng(prefix)
    tokens = rng.standard_normal((2, prefix + 16, 8)).astype(np.float32)
    indices = np.sort(np.stack([rng.choice(64, 16, replace=False) for _ in range(2)]), 1)
    data = codec.encode(tokens, indices, model_id=MID, keep_ratio=0.25, num_patches=64, token_dtype=dtype)
    assert data[4] == 2 and int.from_bytes(data[36:40], "little") == prefix
    h, t, i = codec.decode(data)
    assert (h.version, h.num_prefix_tokens, h.keep) == (2, prefix, 16) and t.shape == tokens.shape
    np.testing.assert_allclose(t, tokens, atol=np.abs(tokens).max() / 100)
    assert np.array_equal(i, indices)
    _bad(data[:-2], "truncated")


def test_one_prefix_token_is_still_written_and_read_as_version_1():
    """The version-1 layout, built field by field (P = 1 implied, the last u32 reserved = 0):
    what encode writes for P = 1, byte for byte, and what decode reads."""
    import struct

    tokens, indices = _sample(b=1, k=4, d=8, n=16)
    v1 = (struct.pack("<4sBBBB8sfIIIII", b"MRCT", 1, 3, 1, 0, bytes.fromhex(MID), 0.25, 1, 4, 8, 16, 0)
          + tokens.tobytes() + indices.astype(np.int16).tobytes())
    assert codec.encode(tokens, indices, model_id=MID, keep_ratio=0.25, num_patches=16, token_dtype="fp32") == v1
    h, t, i = codec.decode(v1)
    assert (h.version, h.num_prefix_tokens) == (1, 1) and np.array_equal(t, tokens) and np.array_equal(i, indices)
    _bad(v1[:4] + bytes([3]) + v1[5:], "version 3, this reader understands \\(1, 2\\)")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data):
    try:
        codec.decode(data)
    except codec.CodecError:
        pass


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2000), st.integers(0, 255))
def test_any_single_byte_corruption_is_caught_or_harmless(pos, value):
    tokens, indices = _sample(b=1, k=4, d=8, n=16)
    data = bytearray(codec.encode(tokens, indices, model_id=MID, keep_ratio=0.25, num_patches=16))
    pos %= len(data)
    data[pos] = value
    try:
        h, t, i = codec.decode(bytes(data))
    except codec.CodecError:
        return
    assert t.shape == (h.batch, h.num_prefix_tokens + h.keep, h.dim) and i.shape == (h.batch, h.keep)
    assert ((0 <= i) & (i < h.num_patches)).all()


def test_fast_fp16_casts_are_bit_identical_to_numpy():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(20000) * s for s in (1e-8, 1e-5, 1, 1e3, 1e6)]).astype(np.float32)
    x = np.concatenate([x, np.array([np.nan, np.inf, -np.inf, 0, -0.0, 65504, 65520, 6e-8], np.float32)])
    h = codec.cast(x, np.float16)
    assert (h.view(np.uint16) == x.astype(np.float16).view(np.uint16)).all()
    every_half = np.arange(65536, dtype=np.uint16).view(np.float16)
    f, ref = codec.cast(every_half, np.float32), every_half.astype(np.float32)
    nan = np.isnan(ref)                       # signalling NaNs come back quiet: still NaN
    assert (f.view(np.uint32)[~nan] == ref.view(np.uint32)[~nan]).all() and np.isnan(f[nan]).all()


def test_cast_graphs_are_what_the_committed_tool_builds():
    """The package-data Cast graphs are byte for byte what tools/build_cast_graphs.py makes with
    onnx.helper, and each is one Cast to the dtype its name says."""
    import importlib.util
    from pathlib import Path

    onnx = pytest.importorskip("onnx", reason="rebuilding the graphs needs onnx (the [export] extra)")
    tool = Path(__file__).resolve().parents[2] / "tools" / "build_cast_graphs.py"
    spec = importlib.util.spec_from_file_location("build_cast_graphs", tool)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert set(build.CASTS.values()) == {("FLOAT", "FLOAT16"), ("FLOAT16", "FLOAT")}
    assert sorted(build.CASTS) == sorted(codec.CAST_GRAPHS.values())
    for (src, dst), name in codec.CAST_GRAPHS.items():
        shipped = (build.GRAPHS / name).read_bytes()
        assert shipped == build.cast_graph(*build.CASTS[name]), f"{name}: rerun tools/build_cast_graphs.py"
        model = onnx.load_from_string(shipped)
        (node,) = model.graph.node
        elem = lambda v: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name  # noqa: E731
        to = onnx.helper.tensor_dtype_to_np_dtype(node.attribute[0].i).name
        assert node.op_type == "Cast" and to == dst
        assert (elem(model.graph.input[0]), elem(model.graph.output[0])) == (src, dst)


def test_a_built_wheel_ships_the_cast_graphs(tmp_path):
    """A non-editable install (a wheel built from this tree, installed elsewhere) casts through
    ORT with its own copy of the graphs."""
    import os
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    import importlib.util

    setuptools = pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    if tuple(int(p) for p in setuptools.__version__.split(".")[:2]) < (70, 1) and not importlib.util.find_spec("wheel"):
        pytest.skip(f"setuptools {setuptools.__version__} builds wheels only with the 'wheel' package")
    root, src = Path(__file__).resolve().parents[2], tmp_path / "src"    # a copy: the build writes beside it
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "mercury_onnx", src / "mercury_onnx", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "wheel")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"mercury_onnx/runtime/graphs/{n}" for n in codec.CAST_GRAPHS.values()} <= set(names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import numpy as np\nfrom mercury_onnx.runtime import codec\n"
            f"assert codec.__file__.startswith({str(tmp_path / 'site')!r}), codec.__file__\n"
            "x = np.linspace(-9, 9, 8192, dtype=np.float32)\nh = codec.cast(x, np.float16)\n"
            "assert codec._cast_sessions and (h == x.astype(np.float16)).all()\nprint('ok')")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]
