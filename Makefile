# The short commands the README names. `make test` is what CI runs.

CARGO ?= cargo
# cargo-nextest runs each test in its own process (the end-to-end tests build network
# namespaces and spawn proxies); plain `cargo test` is the fallback.
TEST_RUNNER := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo "nextest run --no-fail-fast" || echo "test")

.PHONY: build test lint fmt codegen static static-test images demo

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
# end-to-end suite (root, iptables and network namespaces; it fails loudly without them).
test: build lint static-test
	$(CARGO) $(TEST_RUNNER) --workspace --target $(MUSL_TARGET)

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
