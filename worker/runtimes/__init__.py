"""Runtimes that run exported models for the report's figures: llama.cpp through llama-cpp-python
(llamacpp.py), ONNX Runtime (ort.py)."""
