"""Benchmark harness for mlserve.

Run ``python -m benchmarks`` from the repository root.  Everything the numbers
are compared against (HTTP floor, batching on/off, offline compute ceiling) is
measured inside the same run, because on a small noisy machine only ratios
taken minutes apart are trustworthy.
"""
