# Everything runs from the project's own virtualenv; `make install` creates it.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python

.PHONY: install lock migrate run test compose-test system-packages lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

# Re-pins every dependency to the newest release the ranges in pyproject.toml allow.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet '.[dev]'
	.lock-venv/bin/pip freeze --exclude payments-platform | sort > constraints.txt
	rm -rf .lock-venv

migrate: install
	$(BIN)/alembic upgrade head

# The whole stack as local processes (PostgreSQL and RabbitMQ must be running); Ctrl-C stops it.
run: install
	$(PY) scripts/run_stack.py

# The AsyncAPI project's own parser (npm, pinned by its lockfile), which the tests run on
# services/gateway/asyncapi.json; installed without running any package's scripts.
ASYNCAPI_PARSER := tests/asyncapi/node_modules/.installed

$(ASYNCAPI_PARSER): tests/asyncapi/package.json tests/asyncapi/package-lock.json | system-packages
	npm ci --prefix tests/asyncapi --ignore-scripts --no-audit --no-fund
	touch $@

# Installs (as root) the Debian packages the suites need, or names the missing ones.
system-packages:
	scripts/system-packages.sh

test: install system-packages $(ASYNCAPI_PARSER)
	$(BIN)/pytest

# The compose suite alone (tests/compose): its own dockerd, stand-in images, the stack.
compose-test: install system-packages
	$(BIN)/pytest tests/compose

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy libs services tools

# Benchmarks (bench/README.md): makes its own databases and vhosts, starts the services as
# processes, removes it all after. BENCH_ARGS="--quick", "--only intake,reads".
bench: install
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
