"""memsnap benchmarks: `python -m bench` (or `make bench`). Each prints ratios measured side by side."""
