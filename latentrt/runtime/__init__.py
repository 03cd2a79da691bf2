"""The torch-free runtime: engines, schedulers, tokenizer, image I/O and pipelines.

Imports nothing heavier than numpy at module level; torch is only imported by the torch backend,
lazily, when asked for.
"""
