# Two commands matter on a fresh machine: `make test` and `make demo`. Each sets up what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTO_SRC := protos/aviary/admin/v1/admin.proto protos/aviary/reports/v1/envoy_metrics.proto

.PHONY: venv test unit e2e lint typecheck protos bench bench-judge prometheus clean demo demo-rollback

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# Debian's prometheus: the e2e tests run it as a plain process on loopback.
prometheus:
	@if ! command -v prometheus >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	  else \
	    echo "prometheus is missing: run 'sudo apt-get install prometheus' (Debian) and retry" >&2; exit 1; \
	  fi; \
	fi

test: venv prometheus
	$(BIN)/pytest -q

unit: venv
	$(BIN)/pytest -q tests/unit

e2e: venv prometheus
	$(BIN)/pytest -q tests/e2e

lint: venv
	$(BIN)/ruff check xds tests deploy
	$(BIN)/mypy

# A live canary through a real Envoy and Prometheus, all on 127.0.0.1 (DEMO_ARGS=--free-ports if ports are taken).
demo: venv prometheus
	$(BIN)/python deploy/demo/demo.py $(DEMO_ARGS)

# The same with a v2 that fails ~20 % of requests: the automatic rollback.
demo-rollback: venv prometheus
	$(BIN)/python deploy/demo/demo.py --rollback $(DEMO_ARGS)

# QUICK=1: small N, no Prometheus (tests/e2e/test_bench_quick.py runs it). BENCH_ARGS: see tests/bench/run.py.
bench: venv prometheus
	$(BIN)/python -m tests.bench.run $(if $(QUICK),--quick) $(BENCH_ARGS)

# The statistical judge by simulation (no processes, a few CPU minutes): A/A false rollbacks, detection
# speed against a fixed-horizon test. JUDGE_ARGS: see tests/bench/judge_simulation.py (--quick: 200 runs).
bench-judge: venv
	$(BIN)/python -m tests.bench.judge_simulation $(JUDGE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Generated admin API code is committed; this regenerates it (a test fails when it is stale).
protos: venv
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=xds --pyi_out=xds --grpc_python_out=xds $(PROTO_SRC)
