# Two commands set up and run everything on a fresh Debian machine:
#   make demo   create the venv, install capmon, run the zero-setup demo
#   make test   create the venv, install what tests need (influxd, victoria-metrics, prometheus,
#               slurm + munge), run the suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: venv servers test lint demo bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "capmon needs Python 3.10 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

# The integration tests run real InfluxDB 1.x and VictoriaMetrics from Debian's packages.
SERVER_PACKAGES := influxdb victoria-metrics prometheus slurm-wlm munge chromium
servers:
	@if command -v influxd >/dev/null && command -v victoria-metrics >/dev/null && command -v prometheus >/dev/null \
		&& command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(SERVER_PACKAGES) (Debian packages) for the integration tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SERVER_PACKAGES) >/dev/null; \
	else \
		echo "integration tests need real servers: sudo apt-get install $(SERVER_PACKAGES)"; \
		echo "(without them those tests are skipped)"; \
	fi

lint: venv
	$(BIN)/ruff check .

test: venv servers lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

demo: venv
	$(BIN)/capmon demo

bench: venv servers
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
