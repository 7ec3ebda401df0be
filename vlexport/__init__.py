"""vlexport: compile LLaVA-style vision-language models and their adapters into deployable bundles."""

__version__ = "0.1.0"


def load(path, threads=None):
    """Load a bundle for generation (ONNX Runtime; no torch needed)."""
    from .runtime import Bundle

    return Bundle(path, threads=threads)
