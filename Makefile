# The short commands the README names. `make test` is what CI runs.

CARGO ?= cargo
# cargo-nextest runs each test in its own process (the end-to-end tests build network
# namespaces and spawn proxies); plain `cargo test` is the fallback.
TEST_RUNNER := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo "nextest run --no-fail-fast" || echo "test")

.PHONY: build test lint fmt codegen

build:
	$(CARGO) build --workspace --bins

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) xtask codegen --check

# Formatting, lints, generated files, then every test: unit, stack, in-process and the
# end-to-end suite (root, iptables and network namespaces; it fails loudly without them).
test: lint build
	$(CARGO) $(TEST_RUNNER) --workspace

fmt:
	$(CARGO) fmt --all

codegen:
	$(CARGO) xtask codegen
