import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    from vlexport.fixture import make_llava

    return make_llava(tmp_path_factory.mktemp("tiny") / "llava", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_gqa_base(tmp_path_factory):
    from vlexport.fixture import make_llava

    return make_llava(tmp_path_factory.mktemp("tinygqa") / "llava", "tiny-gqa", seed=3)


@pytest.fixture(scope="session")
def outlier_base(tmp_path_factory):
    """The tiny base with injected activation outliers: what INT8/INT4 lowering must survive."""
    from vlexport.fixture import make_llava

    return make_llava(tmp_path_factory.mktemp("outliers") / "llava", "tiny", seed=0, outliers=True)


@pytest.fixture(scope="session")
def full_lora(tiny_base, tmp_path_factory):
    """The issue's adapter: vision + projector + language, DoRA, rsLoRA with patterns, lm_head in modules_to_save."""
    from vlexport.fixture import make_lora

    return make_lora(
        tiny_base, tmp_path_factory.mktemp("lora") / "full", seed=11,
        use_dora=True, use_rslora=True, rank_pattern={"v_proj": 4, "fc1": 2}, alpha_pattern={"down_proj": 5, "linear_1": 3},
        modules_to_save=["lm_head"],
    )


@pytest.fixture(scope="session")
def bitfit_dump(tiny_base, tmp_path_factory):
    from vlexport.fixture import make_bitfit

    return make_bitfit(tiny_base, tmp_path_factory.mktemp("bitfit") / "bitfit.safetensors", seed=12)


@pytest.fixture(scope="session")
def photos():
    import skimage.data
    from PIL import Image

    return {n: Image.fromarray(getattr(skimage.data, n)()) for n in ("astronaut", "chelsea", "coffee", "rocket")}


@pytest.fixture(scope="session")
def full_bundle(tiny_base, full_lora, bitfit_dump, tmp_path_factory):
    """tiny base + full LoRA + BitFit, built through the CLI (parity verify included)."""
    from typer.testing import CliRunner

    from vlexport.cli import app

    out = tmp_path_factory.mktemp("bundles") / "full"
    result = CliRunner().invoke(
        app, ["build", "--base", str(tiny_base), "--adapter", str(full_lora), "--adapter", str(bitfit_dump), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def llava7b_config(tmp_path_factory):
    """LLaVA-1.5-7B's config.json and tokenizer, no weights (plan and parameter-count tests)."""
    from vlexport.fixture import write_llava_config

    return write_llava_config(tmp_path_factory.mktemp("7b") / "llava-1.5-7b", "7b-shaped")


@pytest.fixture(scope="session")
def orin_bundle(tiny_base, full_lora, tmp_path_factory):
    """tiny base + full LoRA for jetson-orin, built through the CLI (verify included) where TensorRT is absent:
    engines planned, build.sh written. Shared by test_targets_plan.py and test_engines.py (which works on copies)."""
    from typer.testing import CliRunner

    from vlexport.cli import app

    out = tmp_path_factory.mktemp("orin") / "bundle"
    r = CliRunner().invoke(app, ["build", "--base", str(tiny_base), "--adapter", str(full_lora), "--target", "jetson-orin",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "TensorRT engines were not built on this machine" in " ".join(r.output.split())
    return out
