# DeepTrace: the two commands a user needs are `make run` and `make test`.
VENV := .venv
CONFIG ?= config/agent.yaml

.PHONY: setup run test bench accuracy clean

setup:
	bash scripts/setup.sh

run: setup
	$(VENV)/bin/deeptrace --config $(CONFIG)

test: setup
	$(VENV)/bin/python -m pytest -v tests

bench: setup
	$(VENV)/bin/python -m bench

accuracy: setup
	$(VENV)/bin/python -m bench.accuracy
	$(VENV)/bin/python -m bench.accuracy --asyncio

clean:
	rm -rf $(VENV) *.egg-info build
