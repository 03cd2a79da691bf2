"""Benchmarks: scenarios, a harness that measures latentrt and the diffusers baseline side by side in
one process, environment capture, statistics and Markdown/PNG reports (``latentrt bench``,
``latentrt report``). Needs the ``bench`` extra (psutil, matplotlib); the baseline needs ``export``."""

SCHEMA = "latentrt-bench/1"
