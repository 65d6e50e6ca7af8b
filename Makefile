# icegate's developer entry points. Every target creates the virtual environment it needs, so
# `make run` and `make test` are the only two commands a fresh clone needs.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
PROTOS := $(wildcard protos/icegate/v1/*.proto)
GENERATED_DIR := client/icegate/v1
# The Node client (client/node/): its npm packages (pinned by package-lock.json) and its
# generated TypeScript. Only the Node tests and `make proto`'s TypeScript part need Node.
NODE_DIR := client/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
NODE_GENERATED_DIR := $(NODE_DIR)/src/gen

.PHONY: all venv proto proto-node proto-check run test lint buf contract-release coturn demo bench profile soak clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable '.[server,dev]'
	touch $(STAMP)

venv: $(STAMP)

# buf (`make lint`, tests/integration/test_contract_hygiene.py) comes from npm's @bufbuild/buf,
# pinned in tools/buf/package-lock.json; Debian has no buf. Node and npm are Debian packages.
BUF_DIR := tools/buf
BUF := $(BUF_DIR)/node_modules/.bin/buf
BUF_STAMP := $(BUF_DIR)/node_modules/.installed

$(BUF_STAMP): $(BUF_DIR)/package.json $(BUF_DIR)/package-lock.json
	scripts/install-system-packages
	cd $(BUF_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $(BUF_STAMP)

buf: $(BUF_STAMP)

# The contract as last released, for `buf breaking`: a committed buf image per release
# (protos/released/vX.Y.Z.binpb), the newest by version order. Tag-independent on purpose: a
# CI clone may be shallow or carry no tags, and the image is what was released whatever
# happens to the tags. At a release, `make contract-release` writes the image of the version in
# pyproject.toml; commit it with the release.
RELEASED_CONTRACT = $(shell ls protos/released/v*.binpb 2>/dev/null | sort -V | tail -n 1)
VERSION = $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)

contract-release: $(BUF_STAMP)
	$(BUF) build --exclude-source-info -o protos/released/v$(VERSION).binpb
	@echo "wrote protos/released/v$(VERSION).binpb: commit it with the release"

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
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory proto-node; \
	elif [ "$${CI-}" = true ]; then echo "make proto: npm not found (CI=true): run scripts/install-system-packages"; exit 1; \
	else echo "make proto: npm not found, $(NODE_GENERATED_DIR) left as it is (scripts/install-system-packages installs Node)"; fi

# The Node client's messages and service descriptors (protoc-gen-es, pinned in
# client/node/package.json) from the same protos, plus google.rpc's error details, which
# its typed errors decode (from googleapis-common-protos in the venv), and gRPC's health
# service, from the descriptor grpcio-health-checking registers (it ships no .proto file).
export NODE_HEALTH_DESCRIPTOR := import sys; from google.protobuf import descriptor_pb2; \
  from grpc_health.v1 import health_pb2; files = descriptor_pb2.FileDescriptorSet(); \
  health_pb2.DESCRIPTOR.CopyToProto(files.file.add()); sys.stdout.buffer.write(files.SerializeToString())
proto-node: $(STAMP) $(NODE_STAMP)
	rm -rf $(NODE_GENERATED_DIR)
	mkdir -p $(NODE_GENERATED_DIR)
	$(BIN)/python -m grpc_tools.protoc -I protos \
	  -I "$$($(BIN)/python -c 'import google.rpc, os; print(os.path.dirname(os.path.dirname(list(google.rpc.__path__)[0])))')" \
	  --plugin=protoc-gen-es=$(NODE_DIR)/node_modules/.bin/protoc-gen-es \
	  --es_out=$(NODE_GENERATED_DIR) --es_opt=target=ts,import_extension=js \
	  $(PROTOS) google/rpc/error_details.proto
	$(BIN)/python -c "$$NODE_HEALTH_DESCRIPTOR" > $(NODE_DIR)/node_modules/.grpc-health.binpb
	$(BIN)/python -m grpc_tools.protoc --descriptor_set_in=$(NODE_DIR)/node_modules/.grpc-health.binpb \
	  --plugin=protoc-gen-es=$(NODE_DIR)/node_modules/.bin/protoc-gen-es \
	  --es_out=$(NODE_GENERATED_DIR) --es_opt=target=ts,import_extension=js \
	  grpc_health/v1/health.proto

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	command -v npm >/dev/null 2>&1 || scripts/install-system-packages
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

# Regenerates the committed stubs (Python, and TypeScript where npm is) and fails if they
# differ from what is committed. Without npm (outside CI) the TypeScript is not checked.
proto-check: proto
	@git diff --exit-code --stat -- $(GENERATED_DIR) $(NODE_GENERATED_DIR) || \
	  { echo "generated code is stale: run 'make proto' and commit $(GENERATED_DIR) $(NODE_GENERATED_DIR)"; exit 1; }
	@test -z "$$(git status --porcelain -- $(GENERATED_DIR) $(NODE_GENERATED_DIR))" || \
	  { echo "generated code is not committed: run 'make proto' and commit $(GENERATED_DIR) $(NODE_GENERATED_DIR)"; exit 1; }

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
run: $(STAMP)
	mkdir -p $(DEV_DIR)/coturn
	ICEGATE_HTTP_LISTEN="$${ICEGATE_HTTP_LISTEN-$(DEV_HTTP_LISTEN)}" $(DEV_SETTINGS) $(BIN)/icegate-server $(ARGS)

# Uses the committed stubs; a test fails when they differ from what `make proto` generates.
test: $(STAMP) $(BUF_STAMP) $(NODE_STAMP)
	scripts/install-system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP) $(BUF_STAMP)
	$(BIN)/ruff check client server tests examples
	$(BIN)/mypy
	$(BUF) lint
	$(BUF) breaking --against $(RELEASED_CONTRACT)

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
# FastAPI, with h2load: about 25-30 minutes (BENCH_QUICK=1: about 8, 4 of one short run of
# each measure, what does not fit left out with a note, then the callgrind section;
# BENCH_INSTRUCTIONS=0 leaves that out). Writes bench/results/ and prints the summary; see
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
	rm -rf $(NODE_DIR)/node_modules $(NODE_DIR)/dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# A bounded soak run (10 min, SQLite, 200 RPC/s by default) that fails on leaks and unexpected
# errors: SOAK_ARGS="--minutes 3 --store redis --report /tmp/soak.md". See docs/RELIABILITY.md.
soak: $(STAMP)
	$(BIN)/python tests/soak/run_soak.py $(SOAK_ARGS)
