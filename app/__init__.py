"""modelpress API service.

Importing this package must stay light: no torch, no transformers (see tests/test_lean_import.py).
"""
