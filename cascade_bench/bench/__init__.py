"""Benchmarks behind the ``bench-*`` commands, and the pytest-benchmark report.

- ``routing``: full cascade vs routed vs masked early exit
- ``blocks``: blocks of one model vs the unsplit model, per exit rule
- ``generation``: decode throughput against full-depth generation
- ``report``: tables and a plot from a pytest-benchmark JSON file
"""
