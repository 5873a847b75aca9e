"""Benchmarks of matlora: quality across ranks, serving and training cost, mixed-rank batching.

Each module is one command (``python -m bench.<name>``) that prints a table and writes
JSON, a PNG and a Markdown table under ``bench/results/``. See ``bench/README.md``.
"""
