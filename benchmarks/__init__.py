"""Speed and memory of the reverse-KL variants: ``python -m benchmarks --help``."""
