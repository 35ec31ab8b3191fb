# The two commands of README.md. Both set up .venv from nothing first (scripts/bootstrap.sh).
.PHONY: up test lint bootstrap bench

bootstrap:
	@scripts/bootstrap.sh

up: bootstrap
	.venv/bin/parley up

lint: bootstrap
	.venv/bin/buf lint
	.venv/bin/buf format --diff --exit-code

test: bootstrap
	.venv/bin/python -m pytest -q

bench: bootstrap
	.venv/bin/pip install --quiet --find-links "$${PARLEY_WHEELHOUSE:-$$HOME/.cache/parley/wheels}" -e '.[dev,bench]'
	.venv/bin/python -m bench.memory_bench
	.venv/bin/python -m bench.recall_heavy
	.venv/bin/python -m bench.chat_bench
	.venv/bin/python -m bench.chat_bench --think-ms 2000
	.venv/bin/python -m bench.inference.local_model
