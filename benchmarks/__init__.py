"""The benchmark suite (``python -m benchmarks.run_suite``); not part of the installed package."""
