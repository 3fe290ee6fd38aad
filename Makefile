# DeepTrace: the two commands a user needs are `make run` and `make test`.
VENV := .venv
CONFIG ?= config/agent.yaml

.PHONY: setup run test bench clean

setup:
	bash scripts/setup.sh

run: setup
	$(VENV)/bin/deeptrace --config $(CONFIG)

test: setup
	$(VENV)/bin/python -m pytest -v tests

clean:
	rm -rf $(VENV) *.egg-info build
