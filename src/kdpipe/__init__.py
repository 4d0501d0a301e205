"""kdpipe: reproducible knowledge distillation, from teacher to a promoted ONNX student.

The core package is plain PyTorch / ONNX / MLflow code; it never imports zenml.
"""

__version__ = "0.1.0"
