# The two commands of the README: `make demo` and `make test`. Both set up what they need.
.PHONY: setup demo test test-quick bench

setup:
	@tools/setup

demo: setup
	.venv/bin/memsnap demo

test: setup
	.venv/bin/python -m pytest -ra

test-quick: setup
	.venv/bin/python -m pytest -ra -m "not slow and not vm and not nodes and not cluster"

bench: setup
	.venv/bin/python -m bench
