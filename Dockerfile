# Remora's images, from one multi-stage build:
#
#   proxy       the sidecar: a static binary on an empty base, user 2102 (the UID
#               remora-init exempts from redirection)
#   controller  the control plane: a static binary on an empty base, user 2103
#   init        remora-init with iptables (nft and legacy back ends), run as root with
#               only NET_ADMIN and NET_RAW (the injector sets that)
#   demo        the demo's apps (deploy/demo/demo.yaml): a static binary on an empty
#               base, user 65532
#
#   make images                      build all four (see the Makefile)
#   buildah bud --target proxy -t remora/proxy .
#
# The binaries come from the `build` stage (Rust on musl, in the container) unless
# `--build-arg BINARIES=prebuilt` is given: then they are taken from dist/<arch>/ in
# the build context (amd64, arm64: the platform being built), where `make static`
# puts them. CI checks the images that way without pulling a Rust image, from the
# test build's static binaries (`--build-arg DIST=dist/test`, where `make static-test`
# puts them). Needs a builder that skips unused stages (BuildKit, buildah 1.27+).

ARG BINARIES=build
ARG DIST=dist
ARG RUST_IMAGE=docker.io/library/rust:1-slim-bookworm
ARG DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim

# --- the binaries, built here -------------------------------------------------------
FROM ${RUST_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN set -eu; \
    triple="$(uname -m)-unknown-linux-musl"; \
    rustup target add "$triple"; \
    cargo build --release --locked --target "$triple" \
        -p remora-proxy -p remora-controller -p remora-init -p remora-cli -p remora-demo; \
    mkdir /out; \
    for bin in remora-proxy remora-controller remora-init remora remora-demo; do \
        install -m 0755 "target/$triple/release/$bin" /out/; \
    done

# --- or built beforehand (make static) ----------------------------------------------
FROM scratch AS prebuilt
ARG TARGETARCH
ARG DIST
COPY ${DIST}/${TARGETARCH}/remora-proxy ${DIST}/${TARGETARCH}/remora-controller ${DIST}/${TARGETARCH}/remora-init ${DIST}/${TARGETARCH}/remora ${DIST}/${TARGETARCH}/remora-demo /out/

FROM ${BINARIES} AS binaries

# --- the images ---------------------------------------------------------------------
FROM scratch AS proxy
COPY --from=binaries /out/remora-proxy /remora-proxy
USER 2102:2102
# The admin port (/ready, /live, /metrics) and the two redirect targets.
EXPOSE 4191 4140 4143
ENTRYPOINT ["/remora-proxy"]

FROM scratch AS controller
COPY --from=binaries /out/remora-controller /remora-controller
USER 2103:2103
EXPOSE 8086 8443 9990
ENTRYPOINT ["/remora-controller"]

FROM ${DEBIAN_IMAGE} AS init
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=binaries /out/remora-init /usr/local/bin/remora-init
ENTRYPOINT ["/usr/local/bin/remora-init"]

FROM scratch AS demo
COPY --from=binaries /out/remora-demo /remora-demo
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/remora-demo"]
