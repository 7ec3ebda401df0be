"""The TensorRT backend, checked where TensorRT cannot run: mypy against tensorrt-stubs, and clean failures without it.

Needs `pip install mypy` and `pip install --no-deps "tensorrt-stubs==10.13.0.35.1"` (--no-deps: the stubs depend
on the `tensorrt` package, which downloads from NVIDIA's index and cannot install here). Missing either is a
failure, not a skip: without them this file would prove nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlexport.backends.tensorrt import (
    TensorRTRunner,
    TensorRTUnavailable,
    _engine_mismatches,
    build_engine,
    tensorrt_available,
)
from vlexport.errors import VlexportError

ROOT = Path(__file__).resolve().parents[1]
BACKEND = ROOT / "vlexport" / "backends" / "tensorrt.py"
STUBS_TOOL = ROOT / "tools" / "trt_stubs.py"
INSTALL = 'pip install mypy && pip install --no-deps "tensorrt-stubs==10.13.0.35.1"'

# Follow imports (so the stubs' types are used) but report errors only in the files named on the command line:
# the generated stubs have many errors of their own (`...` as a type, undefined `capsule`, pybind self types).
# follow_imports_for_stubs applies that to .pyi files too; without it mypy reports every error inside the stubs.
# Everything else is mypy's default checking, tightened: all functions checked, and every `type: ignore` must be
# needed (so the deliberate Dims ignore in the backend cannot outlive its reason).
MYPY_CONFIG = """\
[mypy]
follow_imports = silent
follow_imports_for_stubs = True
check_untyped_defs = True
disallow_untyped_defs = True
warn_unused_ignores = True
warn_redundant_casts = True
"""

MISSING_MODULE_SIGNS = ("Cannot find implementation or library stub", "import-not-found", "import-untyped",
                        "Skipping analyzing", "missing library stubs")


@pytest.fixture(scope="module")
def mypy_env(tmp_path_factory) -> dict:
    if importlib.util.find_spec("mypy") is None:
        pytest.fail(f"mypy is not installed, so the TensorRT backend cannot be type-checked; install with:\n  {INSTALL}")
    out = tmp_path_factory.mktemp("trt_stubs")
    stubs = out / "stubs"
    r = subprocess.run([sys.executable, str(STUBS_TOOL), str(stubs)], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        pytest.fail(f"tools/trt_stubs.py could not prepare the tensorrt stubs:\n{r.stderr}{r.stdout}\n"
                    f"install them with:\n  {INSTALL}")
    config = out / "mypy.ini"
    config.write_text(MYPY_CONFIG)
    # One cache for this module's runs: the first run analyses torch and numpy, the next ones reuse it.
    return {"stubs": stubs, "config": config, "cache": out / "mypy_cache"}


def run_mypy(env: dict, target: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(env["config"]), "--cache-dir", str(env["cache"]),
         "--no-error-summary", "--show-error-codes", str(target)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "MYPYPATH": str(env["stubs"])},
    )


def assert_tensorrt_resolved(output: str) -> None:
    bad = [line for line in output.splitlines()
           if "tensorrt" in line and any(sign in line for sign in MISSING_MODULE_SIGNS)]
    assert not bad, "mypy did not resolve tensorrt from the prepared stubs:\n" + "\n".join(bad)


def test_backend_typechecks_against_tensorrt_stubs(mypy_env):
    r = run_mypy(mypy_env, BACKEND)
    output = r.stdout + r.stderr
    assert_tensorrt_resolved(output)
    assert r.returncode == 0, f"mypy found problems in {BACKEND.relative_to(ROOT)}:\n{output}"


def test_typecheck_catches_removed_tensorrt_8_api(mypy_env, tmp_path):
    """The check can fail: calls removed in TensorRT 10, and misuse only the patched stubs reveal, are errors."""
    bad = tmp_path / "trt8_style.py"
    # Each `# expect:` comment is an error mypy must report on that line.
    bad.write_text(textwrap.dedent("""\
        import tensorrt as trt


        def build(path: str, plan: bytes) -> None:
            logger = trt.Logger(trt.Logger.WARNING)
            builder = trt.Builder(logger)
            network = builder.create_network(0)
            config = builder.create_builder_config()
            trt.OnnxParser(network, logger).parse_from_file(path)
            builder.build_engine(network, config)  # expect: "Builder" has no attribute "build_engine"
            config.max_workspace_size = 1 << 30  # expect: "IBuilderConfig" has no attribute "max_workspace_size"
            context = trt.Runtime(logger).deserialize_cuda_engine(plan).create_execution_context()
            context.execute_async_v2([], 0)  # expect: "IExecutionContext" has no attribute "execute_async_v2"
            # Caught only thanks to tools/trt_stubs.py's typing_extensions and builtins.bool patches:
            config.create_timing_cache(path)  # expect: Argument 1 to "create_timing_cache" of "IBuilderConfig" has incompatible type "str"
            config.set_timing_cache(config.create_timing_cache(plan), ignore_mismatch="no")  # expect: Argument "ignore_mismatch" to "set_timing_cache" of "IBuilderConfig" has incompatible type "str"
        """))
    expected = {i: line.split("# expect: ", 1)[1]
                for i, line in enumerate(bad.read_text().splitlines(), 1) if "# expect: " in line}
    r = run_mypy(mypy_env, bad)
    output = r.stdout + r.stderr
    assert_tensorrt_resolved(output)
    assert r.returncode == 1, output
    for line, message in expected.items():
        assert f"{bad.name}:{line}: error: {message}" in output, f"line {line} not reported:\n{output}"
    assert output.count(": error: ") == len(expected), output


def test_stubs_tool_fails_loudly_without_stubs(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("trt_stubs_tool", STUBS_TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(tool, "DIST", "tensorrt-stubs-that-does-not-exist")
    assert tool.main([str(tmp_path / "out")]) == 1
    with pytest.raises(tool.StubsError, match="not installed.*\n.*pip install --no-deps"):
        tool.find_stub_files()


def test_without_tensorrt_fails_cleanly(tmp_path, monkeypatch):
    ok, _ = tensorrt_available()
    if ok:
        pytest.skip("TensorRT and a CUDA GPU are usable here")
    # Both ways TensorRT can be absent: nothing installed (ImportError), and only tensorrt-stubs installed (its
    # bare `tensorrt/` directory imports as an empty namespace package).
    for absent in (True, False):
        with monkeypatch.context() as m:
            if absent:
                m.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
            ok, reason = tensorrt_available()
            assert not ok and "tensorrt" in reason.lower(), reason
            with pytest.raises(TensorRTUnavailable) as e:
                TensorRTRunner(tmp_path / "decoder.engine")
            assert e.value.exit_code == 2 and isinstance(e.value, VlexportError)
            assert "not importable" in str(e.value) and "engines/build.sh" in str(e.value)
            onnx = tmp_path / "vision.onnx"
            onnx.write_bytes(b"not parsed before TensorRT is found")
            profile = {"pixel_values": ((1, 3, 8, 8), (1, 3, 8, 8), (2, 3, 8, 8))}
            with pytest.raises(TensorRTUnavailable) as e:
                build_engine(onnx, tmp_path / "vision.engine", "fp16", [profile])
            assert e.value.exit_code == 2


def test_module_imports_without_tensorrt():
    code = "import sys; sys.modules['tensorrt'] = None; import vlexport.backends.tensorrt"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_build_arguments_checked_before_tensorrt(tmp_path):
    onnx = tmp_path / "decoder.onnx"
    onnx.write_bytes(b"x")
    good = {"inputs_embeds": ((1, 1, 4), (1, 8, 4), (1, 16, 4))}
    cases = [
        (dict(precision="bf8"), "unknown precision"),
        (dict(precision="fp16", strongly_typed=True), "strongly typed"),
        (dict(precision="fp32", dla_core=0), "DLA"),
        (dict(precision="fp16", optimization_level=7), "optimization level"),
        (dict(precision="fp16", profiles=[]), "no optimization profile"),
        (dict(precision="fp16", profiles=[{"inputs_embeds": ((1, 8, 4), (1, 1, 4), (1, 16, 4))}]), "min <= opt <= max"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("profiles", [good])
        with pytest.raises(VlexportError, match=message) as e:
            build_engine(onnx, tmp_path / "decoder.engine", **kwargs)
        assert not isinstance(e.value, TensorRTUnavailable)


def test_engine_mismatch_names_both_sides():
    built = {"tensorrt_version": "10.3.0", "device_name": "Orin", "compute_capability": [8, 7]}
    assert _engine_mismatches(built, dict(built)) == []
    problems = _engine_mismatches(built, {"tensorrt_version": "10.13.0.35", "device_name": "NVIDIA H100",
                                          "compute_capability": [9, 0]})
    text = "; ".join(problems)
    assert "10.3.0" in text and "10.13.0.35" in text and "Orin (sm_87)" in text and "NVIDIA H100 (sm_90)" in text


def test_decoder_profile_choice():
    """Prefill (past length 0) -> context profile 0; decode steps -> generation profile 1; no fit -> clear error."""
    runner = object.__new__(TensorRTRunner)  # no engine: only the profile ranges matter here
    past = "past_key_values.0.key"
    runner.ranges = [
        {"inputs_embeds": ((1, 1, 4), (1, 64, 4)), past: ((1, 2, 0, 8), (1, 2, 0, 8))},
        {"inputs_embeds": ((1, 1, 4), (1, 1, 4)), past: ((1, 2, 1, 8), (1, 2, 127, 8))},
    ]
    assert runner._choose_profile({"inputs_embeds": (1, 1, 4), past: (1, 2, 0, 8)}) == 0
    assert runner._choose_profile({"inputs_embeds": (1, 9, 4), past: (1, 2, 0, 8)}) == 0
    assert runner._choose_profile({"inputs_embeds": (1, 1, 4), past: (1, 2, 5, 8)}) == 1
    with pytest.raises(VlexportError, match="fit none of the engine's optimization profiles"):
        runner._choose_profile({"inputs_embeds": (1, 1, 4), past: (1, 2, 128, 8)})


def test_runner_infer_loop_with_fake_engine(monkeypatch):
    """infer()'s own logic (casts, shapes, zero-size inputs, addresses, profile switch, copy back) without TensorRT:
    a fake execution context over CPU tensors stands in for the engine; torch's CUDA calls are redirected to CPU."""
    import numpy as np
    import torch

    created: dict[int, torch.Tensor] = {}  # data_ptr -> tensor, so the fake context can find its buffers
    real_empty = torch.empty

    def empty_on_cpu(*args, dtype=None, device=None, **kwargs):
        t = real_empty(*args, dtype=dtype, **kwargs)
        created[t.data_ptr()] = t
        return t

    monkeypatch.setattr(torch, "empty", empty_on_cpu)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())

    class FakeStream:
        cuda_stream = 1234

        def synchronize(self):
            pass

    class FakeContext:
        """decoder: logits = 2 * inputs_embeds (as fp16); present = past with the new positions appended."""

        def __init__(self):
            self.shapes, self.addresses, self.profiles = {}, {}, []

        def set_optimization_profile_async(self, profile, stream):
            assert stream == FakeStream.cuda_stream
            self.profiles.append(profile)
            return True

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, address):
            assert address != 0, f"null address for {name}"
            self.addresses[name] = address
            return True

        def get_tensor_shape(self, name):
            b, s, h = self.shapes["inputs_embeds"]
            if name == "logits":
                return (b, s, h)
            b, kv, p, hd = self.shapes["past_key_values.0.key"]
            return (b, kv, p + s, hd)

        def execute_async_v3(self, stream):
            buf = {n: created[a] for n, a in self.addresses.items()}
            emb = buf["inputs_embeds"][: math.prod(self.shapes["inputs_embeds"])]
            assert buf["attention_mask"].dtype == torch.int32  # fed int64, cast to the engine's INT32
            buf["logits"][: emb.numel()] = (emb * 2).half()
            past_shape = self.shapes["past_key_values.0.key"]
            past = buf["past_key_values.0.key"][: math.prod(past_shape)].reshape(past_shape)
            b, kv, p, hd = past_shape
            new = torch.full((b, kv, self.shapes["inputs_embeds"][1], hd), float(p + 1))
            buf["present.0.key"][:] = torch.cat([past, new], dim=2).reshape(-1)
            return True

    runner = object.__new__(TensorRTRunner)
    runner.context, runner.stream, runner.active_profile = FakeContext(), FakeStream(), 0
    runner.input_names = ["inputs_embeds", "attention_mask", "past_key_values.0.key"]
    runner.output_names = ["logits", "present.0.key"]
    runner.dtypes = {"inputs_embeds": (np.float32, torch.float32), "attention_mask": (np.int32, torch.int32),
                     "past_key_values.0.key": (np.float32, torch.float32), "logits": (np.float16, torch.float16),
                     "present.0.key": (np.float32, torch.float32)}
    past_name = "past_key_values.0.key"
    runner.ranges = [
        {"inputs_embeds": ((1, 1, 4), (1, 16, 4)), "attention_mask": ((1, 1), (1, 16)), past_name: ((1, 2, 0, 3),) * 2},
        {"inputs_embeds": ((1, 1, 4), (1, 1, 4)), "attention_mask": ((1, 2), (1, 32)),
         past_name: ((1, 2, 1, 3), (1, 2, 31, 3))},
    ]
    past = np.zeros((1, 2, 0, 3), np.float32)  # prefill: a zero-size cache input
    emb = np.arange(20, dtype=np.float32).reshape(1, 5, 4)
    out = runner.infer({"inputs_embeds": emb, "attention_mask": np.ones((1, 5), np.int64), past_name: past})
    assert runner.context.profiles == []  # profile 0 is already active
    assert out["logits"].dtype == np.float16 and np.array_equal(out["logits"], (emb * 2).astype(np.float16))
    assert out["present.0.key"].shape == (1, 2, 5, 3) and (out["present.0.key"] == 1).all()

    step = np.ones((1, 1, 4), np.float32)
    out2 = runner.infer({"inputs_embeds": step, "attention_mask": np.ones((1, 6), np.int64),
                         past_name: out["present.0.key"]})
    assert runner.context.profiles == [1] and runner.active_profile == 1  # decode step: generation profile
    assert out2["present.0.key"].shape == (1, 2, 6, 3)
    assert np.array_equal(out2["present.0.key"][:, :, :5], out["present.0.key"])
    assert (out2["present.0.key"][:, :, 5] == 6).all()
    with pytest.raises(VlexportError, match="missing inputs"):
        runner.infer({"inputs_embeds": step})
