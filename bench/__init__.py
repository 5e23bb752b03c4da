"""The benchmarks and the identity check, apart from the method: python -m bench --help
(bench/__main__.py); python -m bench.pin_outputs (bench/pin_outputs.py)."""
