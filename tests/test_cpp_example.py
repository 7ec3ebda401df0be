"""examples/cpp configures and builds everywhere: with onnxruntime-genai's header it builds the example, without it
(as in CI, where no registry ships that header) it still builds vlexport's preprocessing library."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_example_configures_without_ort_genai_header(tmp_path):
    if not shutil.which("cmake"):
        pytest.fail("cmake is needed to build vlexport's C++ code: apt-get install cmake g++")
    build = tmp_path / "build"
    configure = subprocess.run(["cmake", "-S", str(ROOT / "examples" / "cpp"), "-B", str(build)],
                               capture_output=True, text=True)
    assert configure.returncode == 0, configure.stderr
    assert "ort_genai_c.h not found" in configure.stdout
    done = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(build.rglob("libvlexport_preprocess.a"))
    assert not list(build.rglob("vlexport_genai"))
