# The short commands the README names. `make test` is what CI runs.

CARGO ?= cargo
# Recipes use bash (PIPESTATUS in the fuzz runs).
SHELL := /bin/bash
# cargo-nextest runs each test in its own process (the end-to-end tests build network
# namespaces and spawn proxies); plain `cargo test` is the fallback.
TEST_RUNNER := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo "nextest run --no-fail-fast" || echo "test")

.PHONY: build test lint fmt codegen static static-test images demo fuzz fuzz-smoke fuzz-seeds

# Everything `make test` runs is built for the machine's musl target: the libc the images
# ship, and one compile set shared by the binaries, the tests and the images suite's static
# binaries (a glibc build beside it would compile every dependency twice).
MUSL_TARGET ?= $(shell uname -m)-unknown-linux-musl
DIST_ARCH := $(shell uname -m | sed 's/x86_64/amd64/;s/aarch64/arm64/')
STATIC_BINS := remora-proxy remora-controller remora-init remora remora-demo
# What `make static` and `make demo` build: one release compile set for both.
RELEASE_PACKAGES := -p remora-proxy -p remora-controller -p remora-init -p remora-cli -p remora-demo

# The binaries and every test target in one invocation, so they share one compile set:
# built apart, the binaries would get the dependencies' features without the tests'
# (tokio's `test-util`), and tokio and all above it would be compiled twice. The tests
# then reuse it all, and so does `xtask codegen --check` (`cargo xtask` would resolve
# xtask's features alone: a third set).
build:
	$(CARGO) build --workspace --bins --tests --target $(MUSL_TARGET)

lint: build
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	target/$(MUSL_TARGET)/debug/xtask codegen --check

# Formatting, lints, generated files, then every test: unit, stack, in-process and the
# end-to-end suite (root, iptables and network namespaces; it fails loudly without them),
# and last a short run of every fuzz target (cargo-fuzz).
test: build lint static-test
	$(CARGO) $(TEST_RUNNER) --workspace --target $(MUSL_TARGET)
	$(MAKE) --no-print-directory fuzz-smoke

fmt:
	$(CARGO) fmt --all

codegen:
	$(CARGO) xtask codegen

# Static (musl) release binaries, as the images ship them, copied to dist/<arch>/ for
# the Dockerfile's prebuilt stage.
static:
	$(CARGO) build --release --locked --target $(MUSL_TARGET) $(RELEASE_PACKAGES)
	$(call publish,target/$(MUSL_TARGET)/release,dist/$(DIST_ARCH))

# The images suite's binaries: the static dev build `make build` made, in dist/test/<arch>/
# (`--build-arg DIST=dist/test`), so the suite builds nothing of its own and never puts
# unoptimised binaries where `make images BINARIES=prebuilt` looks.
static-test: build
	$(call publish,target/$(MUSL_TARGET)/debug,dist/test/$(DIST_ARCH))

# $(call publish,FROM,TO): the binaries copied from FROM to TO, replaced only when changed
# and atomically (a rename): a build reading TO at the same time (the images suite runs
# this beside itself) never sees half a binary.
define publish
	mkdir -p $(2)
	for b in $(STATIC_BINS); do \
		cmp -s $(1)/$$b $(2)/$$b || { cp -p $(1)/$$b $(2)/$$b.tmp && mv $(2)/$$b.tmp $(2)/$$b; } || exit 1; \
	done
endef

# The four images (Dockerfile): <REGISTRY>/{proxy,controller,init,demo}:<TAG>, with docker,
# podman or buildah, whichever is found first. BINARIES=prebuilt takes `make static`'s
# binaries instead of building them in a Rust image.
REGISTRY ?= ghcr.io/remora-mesh
TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ENGINE ?= $(shell command -v docker || command -v podman || command -v buildah)
BINARIES ?= build
# buildah and podman cache stages only with --layers (docker's BuildKit always does):
# without it the Rust stage would be built once per image.
LAYERS := $(if $(findstring docker,$(notdir $(ENGINE))),,--layers)
images:
	@test -n "$(ENGINE)" || { echo "make images: needs docker, podman or buildah" >&2; exit 1; }
	for image in proxy controller init demo; do \
		$(ENGINE) build $(LAYERS) --build-arg BINARIES=$(BINARIES) \
			--target $$image -t $(REGISTRY)/$$image:$(TAG) . || exit 1; \
	done

# The whole mesh on this machine, no cluster (root): pods as network namespaces, the
# controller, a proxy in every pod, five acts and a live table, then a summary; removes
# all it made when it ends. DURATION=60s by default (make demo DURATION=30s).
# Built as the user who runs make; run as root (through sudo, when there is one).
SUDO := $(if $(filter 0,$(shell id -u)),,$(shell command -v sudo))
demo:
	$(CARGO) build --release --target $(MUSL_TARGET) $(RELEASE_PACKAGES)
	$(SUDO) target/$(MUSL_TARGET)/release/remora-demo $(if $(DURATION),--duration $(DURATION))

# Fuzzing (cargo-fuzz; the targets are in fuzz/, what they run in crates/remora-fuzz; see
# docs/reliability.md). Each target starts from the seeds `remora-fuzz seeds` writes (from
# the repository's YAML and the tests' inputs) and grows fuzz/corpus/<target>/; a crash is
# left in fuzz/artifacts/<target>/ and fails the run: move it to fuzz/regressions/<target>/
# (replayed by `make test`) with the fix. cargo-fuzz passes nightly-only flags to rustc:
# RUSTC_BOOTSTRAP lets the stable toolchain take them, so no second toolchain is needed.
# `make fuzz` runs every target FUZZ_SECONDS (default 600) in turn; `make fuzz-smoke`
# (the end of `make test`) FUZZ_SMOKE_SECONDS (default 10). FUZZ_TARGETS= picks some.
FUZZ_TARGETS ?= $(sort $(basename $(notdir $(wildcard fuzz/fuzz_targets/*.rs))))
FUZZ_SECONDS ?= 600
FUZZ_SMOKE_SECONDS ?= 10
FUZZ_SANITIZER ?= none
FUZZ_CARGO := RUSTC_BOOTSTRAP=1 $(CARGO) fuzz

fuzz-seeds: build
	rm -rf fuzz/seeds
	target/$(MUSL_TARGET)/debug/remora-fuzz seeds fuzz/seeds

fuzz: fuzz-seeds
	$(call fuzz_run,$(FUZZ_SECONDS))

fuzz-smoke: fuzz-seeds
	$(call fuzz_run,$(FUZZ_SMOKE_SECONDS))

# $(call fuzz_run,SECONDS): builds the targets, then runs each for SECONDS; prints each
# one's executions and corpus, and on a crash its log's end, and fails.
define fuzz_run
	@$(CARGO) fuzz --version >/dev/null 2>&1 || { echo "make: fuzzing needs cargo-fuzz (cargo install --locked cargo-fuzz)" >&2; exit 1; }
	cd fuzz && $(FUZZ_CARGO) build --sanitizer $(FUZZ_SANITIZER)
	@mkdir -p fuzz/logs
	@failed=; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t; \
		if (cd fuzz && $(FUZZ_CARGO) run --sanitizer $(FUZZ_SANITIZER) $$t corpus/$$t seeds/$$t -- \
			-max_total_time=$(1) -rss_limit_mb=2048 -timeout=10 -print_final_stats=1) >fuzz/logs/$$t-$(1)s.log 2>&1; then \
			printf 'fuzz %-17s %12s runs in %ss, corpus %s inputs\n' $$t \
				"$$(sed -n 's/^stat::number_of_executed_units: *//p' fuzz/logs/$$t-$(1)s.log)" $(1) \
				"$$(ls fuzz/corpus/$$t | wc -l)"; \
		else \
			echo "fuzz $$t: FAILED (fuzz/logs/$$t-$(1)s.log; the input is in fuzz/artifacts/$$t/):" >&2; \
			tail -n 40 fuzz/logs/$$t-$(1)s.log >&2; failed="$$failed $$t"; \
		fi; \
	done; test -z "$$failed" || { echo "make: fuzz targets failed:$$failed" >&2; exit 1; }
endef
