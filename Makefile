# The two commands of the README: `make demo` and `make test`. Both set up what they need.
.PHONY: setup demo test test-quick test-kind bench

setup:
	@tools/setup

demo: setup
	.venv/bin/memsnap demo

# The cluster's Kubernetes binaries and the memsnap image first (cached; ~12 min cold): outside pytest's per-test timeout.
test: setup
	.venv/bin/memsnap cluster build >/dev/null
	.venv/bin/memsnap cluster images >/dev/null
	.venv/bin/python -m pytest -ra

test-quick: setup
	.venv/bin/python -m pytest -ra -m "not slow and not vm and not nodes and not cluster"

# The cluster tests on kind instead of memsnap's own cluster (skipped without a Docker engine).
test-kind: setup
	MEMSNAP_TEST_CLUSTER=kind .venv/bin/python -m pytest -ra -m cluster

bench: setup
	.venv/bin/python -m bench
