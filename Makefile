# icegate's developer entry points. Every target creates the virtual environment it needs, so
# `make run` and `make test` are the only two commands a fresh clone needs.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
PROTOS := $(wildcard protos/icegate/v1/*.proto)
GENERATED_DIR := client/icegate/v1

.PHONY: all venv proto proto-check run test lint coturn demo bench profile soak clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable '.[server,dev]'
	touch $(STAMP)

venv: $(STAMP)

$(BENCH_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable '.[server,dev,bench]'
	touch $(BENCH_STAMP)

# The one way stubs are made. The proto package maps onto the Python package
# (icegate.v1 -> client/icegate/v1/), so generated imports need no rewriting.
# Connect stubs (`*_connect.py`) sit over the same google.protobuf `_pb2` classes
# (`protobuf=google`), so one set of messages serves both transports.
proto: $(STAMP)
	find $(GENERATED_DIR) \( -name '*_pb2*.py*' -o -name '*_connect.py' \) -delete
	$(BIN)/python -m grpc_tools.protoc -I protos \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	  --plugin=protoc-gen-connectrpc=$(BIN)/protoc-gen-connectrpc \
	  --python_out=client --grpc_python_out=client \
	  --mypy_out=client --mypy_grpc_out=client \
	  --connectrpc_out=client --connectrpc_opt=protobuf=google \
	  $(PROTOS)

# Regenerates the committed stubs and fails if they differ from what is committed.
proto-check: proto
	@git diff --exit-code --stat -- $(GENERATED_DIR) || \
	  { echo "generated code is stale: run 'make proto' and commit $(GENERATED_DIR)"; exit 1; }
	@test -z "$$(git status --porcelain -- $(GENERATED_DIR))" || \
	  { echo "generated code is not committed: run 'make proto' and commit $(GENERATED_DIR)"; exit 1; }

# The dev set-up keeps coturn's SQLite userdb in step: `make run` writes the TURN secrets in
# force into $(DEV_DIR)/coturn/turndb (ICEGATE_COTURN_SQLITE), the coturn of `make coturn` reads
# them at every allocation, so `icegate admin turn-secret rotate` reaches coturn without a
# restart. Set ICEGATE_COTURN_SQLITE (or ICEGATE_COTURN_REDIS) yourself to use another.
DEV_DIR ?= .icegate
DEV_COTURN_USERDB = $(abspath $(DEV_DIR))/coturn/turndb
DEV_SETTINGS = ICEGATE_DATA_DIR=$${ICEGATE_DATA_DIR-$(DEV_DIR)} \
	ICEGATE_COTURN_SQLITE=$${ICEGATE_COTURN_SQLITE-$(DEV_COTURN_USERDB)}

# gRPC on 127.0.0.1:50051 and Connect on 127.0.0.1:8080 (ICEGATE_HTTP_LISTEN overrides it;
# set it empty to serve gRPC only; on Python 3.10, which Connect's runtime does not support,
# gRPC only).
DEV_HTTP_LISTEN = $(shell $(BIN)/python -c 'import sys; print("127.0.0.1:8080" if sys.version_info >= (3, 11) else "")')
run: proto
	mkdir -p $(DEV_DIR)/coturn
	ICEGATE_HTTP_LISTEN="$${ICEGATE_HTTP_LISTEN-$(DEV_HTTP_LISTEN)}" $(DEV_SETTINGS) $(BIN)/icegate-server $(ARGS)

# Uses the committed stubs; a test fails when they differ from what `make proto` generates.
test: $(STAMP)
	scripts/install-system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check client server tests examples
	$(BIN)/mypy

# Starts a local coturn with the same secrets, realm and userdb as `make run`'s server, on
# loopback only (so it may relay between loopback peers, for trying calls on this machine).
coturn: $(STAMP)
	scripts/install-system-packages
	mkdir -p $(DEV_DIR)/coturn
	$(DEV_SETTINGS) $(BIN)/icegate-server coturn-config --coturn-allow-loopback-peers \
	  --output $(DEV_DIR)/turnserver.conf $(ARGS)
	turnserver -c $(DEV_DIR)/turnserver.conf

# A realtime call in your browser, on this machine only: the dev server, a coturn in step with it
# (`make coturn`), a local fake OpenAI answering with a real WebRTC peer (a development aid in
# examples/demo/, never part of the server) and the FastAPI example serving the demo page; prints
# the page's URL. Its own data directory, $(DEV_DIR)/demo: the fake's provider key never replaces
# a real one. Ctrl-C stops everything. ARGS="--web 127.0.0.1:9000 ..." (see --help).
demo: $(STAMP)
	scripts/install-system-packages
	$(BIN)/python examples/demo/run.py --data-dir $(DEV_DIR)/demo $(ARGS)

# icegate (over gRPC and over Connect) against a bare grpc.aio server, a bare Connect server and
# FastAPI, with h2load: about 25-30 minutes
# (BENCH_QUICK=1: about 2). Writes bench/results/ and prints the summary; see
# docs/PERFORMANCE.md. `timeout` is the hard bound; the script stops its servers on SIGTERM.
bench: $(BENCH_STAMP)
	@command -v h2load >/dev/null || { echo "make bench needs h2load: apt-get install nghttp2-client"; exit 1; }
	timeout 40m $(BIN)/python bench/run.py

# A py-spy flamegraph of icegate under h2load for 10 s into bench/results/raw/
# (ARGS="--method ice|session --seconds N").
profile: $(BENCH_STAMP)
	@command -v h2load >/dev/null || { echo "make profile needs h2load: apt-get install nghttp2-client"; exit 1; }
	timeout 5m $(BIN)/python bench/profile.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# A bounded soak run (10 min, SQLite, 200 RPC/s by default) that fails on leaks and unexpected
# errors: SOAK_ARGS="--minutes 3 --store redis --report /tmp/soak.md". See docs/RELIABILITY.md.
soak: $(STAMP)
	$(BIN)/python tests/soak/run_soak.py $(SOAK_ARGS)
