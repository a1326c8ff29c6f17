# The image helm/safemode runs: the safemode binary on a distroless base,
# as the non-root user 65532 (the chart's runAsUser). Build from the
# repository's root:
#
#   docker build -t REGISTRY/safemode:0.1.0 .
#
# Stage 1 builds with the Rust toolchain; nothing of it reaches the image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# --locked: exactly the dependencies in Cargo.lock. The protos compile with
# protox and ring with the C compiler the image has: no protoc, no OpenSSL.
RUN cargo build --release --locked -p safemode --bin safemode \
    && cp target/release/safemode /safemode

# Stage 2: glibc, libgcc, CA certificates and tzdata, no shell; "nonroot" is
# user and group 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /safemode /usr/local/bin/safemode
USER 65532:65532
EXPOSE 7700 8080
ENTRYPOINT ["/usr/local/bin/safemode"]
CMD ["--help"]
