# Shortcuts; the README gives the same commands.
.PHONY: install lint test bench

install:
	python3 -m pip install -e '.[test]'

lint:
	ruff check flowcraft_cli tests benchmarks nodes.py
	mypy flowcraft_cli

test:
	python3 -m pytest -q

bench:
	python3 benchmarks/bench_inprocess.py
	python3 benchmarks/bench_distributed.py
	python3 benchmarks/bench_reconcile.py
	python3 benchmarks/bench_recovery.py
