# Images for the sidecar and the operator: release binaries built with
# whole-program optimisation (Cargo.toml's `dist` profile, what the full
# benchmark measures), on a distroless runtime with no shell, running as a
# non-root user.
#
#   docker build --target sidecar  -t ghcr.io/pgwarden/pgwarden:0.1.0 .
#   docker build --target operator -t ghcr.io/pgwarden/pgwarden-operator:0.1.0 .
#
# The binaries link glibc dynamically (libpg_query is C), hence the `cc`
# distroless image rather than `static`.

# The toolchain CI uses (rustc 1.95); the workspace needs at least 1.89.
FROM rust:1.95-bookworm AS build
# pg_query builds libpg_query with bindgen, which needs libclang.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --profile dist --locked -p pgwarden-sidecar --bin pgwarden \
 && cargo build --profile dist --locked -p pgwarden-operator --bin pgwarden-operator

FROM gcr.io/distroless/cc-debian12:nonroot AS sidecar
COPY --from=build /src/target/dist/pgwarden /usr/local/bin/pgwarden
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/pgwarden"]
CMD ["run"]

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /src/target/dist/pgwarden-operator /usr/local/bin/pgwarden-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/pgwarden-operator"]
