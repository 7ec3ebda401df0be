"""TensorRT support that needs no TensorRT: optimization profiles, trtexec plans and ONNX import-rule checks."""
