"""Reproducible Chunkyard benchmarks (DESIGN §7): each prints a table and writes JSON to benchmarks/out/.

Shared machine-limit probes, test data and the server process live in `benchmarks.common`.
"""
