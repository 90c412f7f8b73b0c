"""Autopack's benchmark suite (issue 7): `make bench`, `make bench-smoke`, docs/benchmarks.md.

Benchmarks are not timed tests: they measure this machine, each figure next to a floor taken in
the same run, and the CI smoke test only checks that every figure is still produced.
"""
