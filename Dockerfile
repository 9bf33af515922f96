# syntax=docker/dockerfile:1
# warren's container image: build the host in the Rust image, run it on a slim Debian.
#   docker build -t warren .
#   docker run --rm -v "$PWD/plugins/dist:/plugins:ro" -v "$PWD/examples/compose.toml:/etc/warren/warren.toml:ro" \
#     -e WARREN_BROKER_URL=amqp://guest:guest@HOST:5672/%2f -p 9090:9090 warren
# Plugins are not baked in: mount them (warren reloads a plugin when its file changes).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Only what the workspace needs to build the host (plugins/ is a separate wasm workspace).
COPY Cargo.toml Cargo.lock ./
COPY wit wit
COPY host host
COPY tests tests
COPY bench bench
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p warren \
    && install -m 0755 target/release/warren /usr/local/bin/warren

FROM debian:bookworm-slim
# curl: for the container health check against the ops endpoint.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /var/lib/warren warren
COPY --from=build /usr/local/bin/warren /usr/local/bin/warren
USER warren
WORKDIR /var/lib/warren
EXPOSE 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s \
    CMD curl -fsS http://127.0.0.1:9090/healthz || exit 1
ENTRYPOINT ["warren"]
CMD ["run", "--config", "/etc/warren/warren.toml"]
