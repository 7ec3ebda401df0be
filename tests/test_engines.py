"""TensorRT hand-over: plan -> engines/build.sh -> `vlexport engines --adopt` -> load, and `vlexport engines` building
through the Python API, with the refusals a user meets (other GPU, other TensorRT, engine from another ONNX).

TensorRT cannot run on this machine (no NVIDIA TensorRT wheel installs here, and there is no GPU): this stand-in is
the only way here. STANDIN below is a small `tensorrt` module that implements just the calls vlexport makes (its
Builder "builds" an engine that is a JSON description of the ONNX part's inputs and outputs and the optimization
profiles it was given; its Runtime reads that back), and a stand-in device (torch.cuda's availability, name and
compute capability) says which GPU we are on. A fake `trtexec` made from the same module runs under the real
engines/build.sh. What this proves is vlexport's own logic around TensorRT: metadata, digests, capability
comparison, manifest updates and messages, not that TensorRT accepts the graphs (tests/test_check_trt.py and
tests/test_tensorrt_typecheck.py cover what can be checked of that without TensorRT).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlexport.bundle import read_manifest, reseal
from vlexport.cli import app
from vlexport.errors import VlexportError

STANDIN = textwrap.dedent('''\
    """A stand-in for the parts of TensorRT's Python API that vlexport calls (see tests/test_engines.py)."""
    import enum
    import json

    import onnx

    __version__ = "10.3.0"
    FORMAT = "standin-tensorrt-engine"


    class DataType(enum.Enum):
        FLOAT = 0
        HALF = 1
        INT8 = 2
        INT32 = 3
        BOOL = 4
        INT64 = 8


    ONNX_TYPES = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 9: DataType.BOOL,
                  7: DataType.INT64}


    class TensorIOMode(enum.Enum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2


    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 1


    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0


    class BuilderFlag(enum.Enum):
        FP16 = 0
        INT8 = 1
        GPU_FALLBACK = 2


    class DeviceType(enum.Enum):
        GPU = 0
        DLA = 1


    class Logger:
        WARNING = 2

        def __init__(self, severity=2):
            self.severity = severity


    def onnx_io(path):
        model = onnx.load(str(path), load_external_data=False)

        def describe(values):
            return [{"name": v.name, "dtype": ONNX_TYPES[v.type.tensor_type.elem_type].name,
                     "shape": [-1 if d.dim_param or not d.HasField("dim_value") else d.dim_value
                               for d in v.type.tensor_type.shape.dim]} for v in values]

        return describe(model.graph.input), describe(model.graph.output)


    def serialize(inputs, outputs, profiles, flags):
        return json.dumps({"format": FORMAT, "version": __version__, "inputs": inputs, "outputs": outputs,
                           "profiles": profiles, "flags": sorted(flags)}).encode()


    class Tensor:
        def __init__(self, spec):
            self.name, self.shape = spec["name"], tuple(spec["shape"])


    class Network:
        def __init__(self):
            self.inputs, self.outputs = [], []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return Tensor(self.inputs[i])


    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            self.network.inputs, self.network.outputs = onnx_io(path)
            return True

        def get_error(self, i):
            return None


    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = [list(lo), list(opt), list(hi)]


    class TimingCache:
        def __init__(self, data=b""):
            if data and not bytes(data).startswith(b"standin-timing-cache"):
                raise RuntimeError("timing cache: bad magic (truncated or not a timing cache)")

        def serialize(self):
            return b"standin-timing-cache v1"


    class BuilderConfig:
        def __init__(self):
            self.flags, self.profiles, self.cache = set(), [], None
            self.builder_optimization_level, self.default_device_type, self.DLA_core = 3, DeviceType.GPU, -1

        def set_memory_pool_limit(self, pool, size):
            self.workspace = size

        def set_flag(self, flag):
            self.flags.add(flag.name)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache


    class Builder:
        num_DLA_cores = 2

        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            return Network()

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return serialize(network.inputs, network.outputs, config.profiles, config.flags)


    class ExecutionContext:
        pass


    class Engine:
        def __init__(self, desc):
            self.desc = desc
            self.tensors = {t["name"]: (TensorIOMode.INPUT, t) for t in desc["inputs"]}
            self.tensors.update({t["name"]: (TensorIOMode.OUTPUT, t) for t in desc["outputs"]})
            self.names = list(self.tensors)

        @property
        def num_io_tensors(self):
            return len(self.names)

        @property
        def num_optimization_profiles(self):
            return len(self.desc["profiles"])

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return self.tensors[name][0]

        def get_tensor_dtype(self, name):
            return DataType[self.tensors[name][1]["dtype"]]

        def get_tensor_profile_shape(self, name, p):
            profile = self.desc["profiles"][p]
            if name in profile:
                return [tuple(s) for s in profile[name]]
            static = tuple(self.tensors[name][1]["shape"])
            return [static, static, static]

        def create_execution_context(self):
            return ExecutionContext()


    class Runtime:
        def __init__(self, logger):
            self.DLA_core = -1

        def deserialize_cuda_engine(self, data):
            try:
                desc = json.loads(bytes(data))
            except ValueError:
                return None
            if desc.get("format") != FORMAT or desc.get("version") != __version__:
                return None  # as TensorRT does with a plan from another version
            return Engine(desc)


    def trtexec(argv):
        """`trtexec --onnx=F --saveEngine=E [--profile=N] --minShapes=.. --optShapes=.. --maxShapes=.. ...`"""
        args, profiles = {}, []
        for a in argv:
            key, _, value = a.partition("=")
            if key == "--profile":
                profiles.append({})
            elif key in ("--minShapes", "--optShapes", "--maxShapes"):
                if not profiles:
                    profiles.append({})
                which = ("--minShapes", "--optShapes", "--maxShapes").index(key)
                for spec in value.split(","):
                    name, dims = spec.rsplit(":", 1)
                    profiles[-1].setdefault(name, [None, None, None])[which] = [int(d) for d in dims.split("x")]
            else:
                args[key] = value
        inputs, outputs = onnx_io(args["--onnx"])
        with open(args["--saveEngine"], "wb") as f:
            f.write(serialize(inputs, outputs, profiles, {"FP16"} if "--fp16" in args else set()))
        with open(args["--timingCacheFile"], "wb") as f:
            f.write(TimingCache().serialize())
''')

TRTEXEC = textwrap.dedent('''\
    #!{python}
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("tensorrt_standin", {module!r})
    trt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trt)
    trt.trtexec(sys.argv[1:])
''')


@pytest.fixture(scope="module")
def standin_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("standin")
    (d / "tensorrt_standin.py").write_text(STANDIN)
    exe = d / "trtexec"
    exe.write_text(TRTEXEC.format(python=sys.executable, module=str(d / "tensorrt_standin.py")))
    exe.chmod(0o755)
    return d


@pytest.fixture
def trt(standin_files, monkeypatch):
    """Install the stand-in TensorRT and a stand-in Orin (sm_87); the test may change either."""
    import torch

    spec = importlib.util.spec_from_file_location("tensorrt", standin_files / "tensorrt_standin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    device = {"name": "Orin (stand-in)", "capability": (8, 7)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: device["name"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: device["capability"])
    monkeypatch.setattr(torch.cuda, "Stream", type("Stream", (), {"cuda_stream": 0}))
    module.device = device
    return module


@pytest.fixture(scope="module")
def planned(orin_bundle):
    """A jetson-orin bundle built here, where TensorRT is absent (conftest's, shared with test_targets_plan.py):
    engines planned, build.sh written. Tests change copies of it only."""
    assert read_manifest(orin_bundle)["engines"]["status"] == "planned"
    return orin_bundle


@pytest.fixture
def bundle(planned, tmp_path):
    dst = tmp_path / "orin"
    shutil.copytree(planned, dst)
    return dst


def engines(*args):
    return CliRunner().invoke(app, ["engines", *map(str, args)])


def assert_refused(r, *expected):
    assert r.exit_code == 2, r.output
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), repr(r.exception)
    out = " ".join(r.output.split())
    for e in expected:
        assert e in out, out


def run_build_sh(bundle: Path, standin_files: Path) -> None:
    r = subprocess.run(["bash", str(bundle / "engines" / "build.sh")], capture_output=True, text=True,
                       env={**os.environ, "TRTEXEC": str(standin_files / "trtexec")})
    assert r.returncode == 0, r.stdout + r.stderr


def test_one_representation_of_compute_capability():
    from vlexport.backends.tensorrt import compute_capability, sm

    for value in ("8.7", [8, 7], (8, 7), "sm_87", 8.7):
        assert compute_capability(value) == "8.7"
    assert compute_capability("10.0") == "10.0" and sm("8.7") == "sm_87"
    with pytest.raises(VlexportError, match="not a compute capability"):
        compute_capability("eighty-seven")


def test_build_sh_then_adopt_then_load(bundle, trt, standin_files):
    from vlexport.engines import open_engines

    plan = (bundle / "engines" / "build.sh").read_text()
    assert "sha256sum decoder.onnx decoder.onnx.data > engines/decoder.engine.source.sha256" in plan
    manifest = read_manifest(bundle)
    assert manifest["engines"]["compute_capability"] == "8.7"
    run_build_sh(bundle, standin_files)
    # What build.sh wrote is not sealed yet: a plain load refuses it, `engines --adopt` records it.
    with pytest.raises(VlexportError, match="does not list"):
        read_manifest(bundle)
    r = engines(bundle, "--adopt")
    assert r.exit_code == 0, r.output
    manifest = read_manifest(bundle)  # sealed again, engines included
    assert manifest["engines"]["status"] == "built"
    for name, part in manifest["engines"]["parts"].items():
        assert part["file"] in manifest["files"] and part["file"] + ".json" in manifest["files"]
        meta = json.loads((bundle / (part["file"] + ".json")).read_text())
        assert meta["compute_capability"] == "8.7" and meta["tensorrt_version"] == "10.3.0"
        assert meta["onnx_sha256"] == manifest["files"][part["onnx"]]["sha256"]
        data = manifest["files"].get(part["onnx"] + ".data")
        assert meta["onnx_data_sha256"] == (data["sha256"] if data else None)
    runners = open_engines(bundle, manifest)
    assert set(runners) == {"vision", "embed", "decoder"}
    assert runners["decoder"].input_names[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert len(runners["decoder"].ranges) == 2  # context and generation profiles, read back from the engine
    import vlexport

    loaded = vlexport.load(bundle, backend="tensorrt")  # the runtime's own path to the engines
    assert set(loaded.runners) == {"vision", "embed", "decoder"}

    # Another GPU: refused by name, with sm_ numbers that mean something.
    trt.device["capability"] = (8, 6)
    with pytest.raises(VlexportError, match=r"built on Orin \(stand-in\) \(sm_87\), this is Orin \(stand-in\) \(sm_86\)"):
        open_engines(bundle, manifest)
    assert_refused(engines(bundle), "is not the target's (sm_87)", "sm_86")
    trt.device["capability"] = (8, 7)

    # Another TensorRT version.
    trt.__version__ = "10.4.0"
    with pytest.raises(VlexportError, match="built with TensorRT 10.3.0, this is TensorRT 10.4.0.*Rebuild it on this device"):
        open_engines(bundle, manifest)
    trt.__version__ = "10.3.0"
    open_engines(bundle, manifest)


def test_engine_from_another_onnx_is_refused(bundle, trt, standin_files):
    """The bundle's decoder weights change (a rebuild with another adapter gives the same .onnx graph file and other
    external data); the old engines are kept. Loading and adopting both refuse, and say how to fix it."""
    from vlexport.engines import open_engines

    run_build_sh(bundle, standin_files)
    assert engines(bundle, "--adopt").exit_code == 0
    data = bundle / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    manifest = reseal(bundle)
    with pytest.raises(VlexportError, match=r"engine 'decoder.engine' was built from another decoder.onnx than this "
                                            r"bundle's: its weights \(external data\) sha256 .*vlexport engines BUNDLE"):
        open_engines(bundle, manifest)
    with pytest.raises(VlexportError, match="built from another decoder.onnx"):
        open_engines(bundle, read_manifest(bundle))  # the same through a fresh, fully checked read
    # Adopting again without rerunning build.sh: its record is of the old ONNX.
    assert_refused(engines(bundle, "--adopt"), "engines/decoder.engine", "built from another decoder.onnx",
                   "bash engines/build.sh")
    run_build_sh(bundle, standin_files)
    assert engines(bundle, "--adopt").exit_code == 0
    open_engines(bundle, read_manifest(bundle))
    # An engine whose metadata records no ONNX at all (made by hand) is refused too.
    meta_path = bundle / "engines" / "vision.engine.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("onnx_sha256")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(VlexportError, match="records no sha256 of the ONNX"):
        open_engines(bundle, reseal(bundle))


def test_adopt_without_build_sh_record_is_refused(bundle, trt, standin_files):
    run_build_sh(bundle, standin_files)
    (bundle / "engines" / "vision.engine.source.sha256").unlink()
    assert_refused(engines(bundle, "--adopt"), "engines/vision.engine.source.sha256' is missing", "bash engines/build.sh")
    read_manifest(bundle, allow_unlisted=[f"engines/{p}.engine{s}" for p in ("vision", "embed", "decoder")
                                          for s in ("", ".source.sha256")] + ["engines/timing.cache"])


def test_engines_built_here_with_a_corrupt_timing_cache(bundle, trt):
    """`vlexport engines` on the device builds through the Python API; a truncated timing cache (a build killed
    while writing it, before writes were atomic) is replaced, and logged, not a crash."""
    from vlexport.engines import build_engines_on_device, open_engines

    (bundle / "engines" / "timing.cache").write_bytes(b"standin-tim")  # truncated
    (bundle / "engines" / ".vision.engine.abc.tmp").write_bytes(b"half")  # an interrupted atomic write
    logged: list[str] = []
    manifest = build_engines_on_device(bundle, adopt=False, log=logged.append)
    assert any("timing.cache" in m and "unreadable" in m for m in logged), logged
    assert any(".vision.engine.abc.tmp" in m for m in logged), logged
    assert (bundle / "engines" / "timing.cache").read_bytes() == b"standin-timing-cache v1"
    assert manifest["engines"]["status"] == "built" and "engines/timing.cache" in manifest["files"]
    manifest = read_manifest(bundle)
    meta = json.loads((bundle / "engines" / "vision.engine.json").read_text())
    assert meta["compute_capability"] == "8.7" and meta["dla_core"] == 0 and meta["onnx"] == "vision.onnx"
    runners = open_engines(bundle, manifest)
    assert runners["vision"].meta["built_by"].startswith("vlexport")
    # No temporary files left, and the manifest is whole JSON (written by one rename).
    assert not [p for p in bundle.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".partial")]


def test_old_engine_metadata_with_a_list_capability_still_compares(bundle, trt, standin_files):
    """Engines built by build_engine before this change recorded [8, 7]; adopted ones "8.7" (which every load then
    refused). Both now mean the same GPU."""
    from vlexport.engines import open_engines

    run_build_sh(bundle, standin_files)
    assert engines(bundle, "--adopt").exit_code == 0
    meta_path = bundle / "engines" / "embed.engine.json"
    meta = json.loads(meta_path.read_text())
    meta["compute_capability"] = [8, 7]
    meta_path.write_text(json.dumps(meta))
    open_engines(bundle, reseal(bundle))
