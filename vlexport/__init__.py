"""vlexport: compile LLaVA-style vision-language models and their adapters into deployable bundles."""

__version__ = "0.1.0"


def load(path, threads=None, backend="onnxruntime"):
    """Load a bundle for generation: ONNX Runtime (no torch needed), or the TensorRT engines built on a device."""
    from .runtime import Bundle

    return Bundle(path, threads=threads, backend=backend)


def __getattr__(name):
    # vlexport.Request without importing the runtime (and onnxruntime) at `import vlexport`.
    if name == "Request":
        from .runtime import Request

        return Request
    raise AttributeError(f"module 'vlexport' has no attribute {name!r}")
