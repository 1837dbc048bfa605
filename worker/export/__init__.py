"""Converters from the steps' safetensors result to deployable formats: GGUF for llama.cpp (gguf.py),
ONNX for ONNX Runtime (onnx.py)."""
