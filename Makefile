# `make run`: install everything, run the embedded default scenario.
# `make test`: install everything, type-check fedmerge/, strategies/ and sims/ (mypy --strict),
# run the whole test suite in two pytest-xdist workers (see README, Development).
.PHONY: run test lint bootstrap

bootstrap:
	@scripts/bootstrap.sh

run: bootstrap
	.venv/bin/fedmerge simulate

test: bootstrap
	.venv/bin/python -m mypy --strict fedmerge strategies sims
	.venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

lint: bootstrap
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
