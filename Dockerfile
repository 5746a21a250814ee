# Historian: a multi-stage build. The first stage compiles the release binaries; the
# second is a small Debian image that runs them as an unprivileged user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p historian -p historian-benches --bins \
 && install -D target/release/historian /out/historian \
 && install -D target/release/historian-datagen /out/historian-datagen

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 historian \
 && useradd --system --uid 10001 --gid historian --home-dir /var/lib/historian historian \
 && install -d -o historian -g historian /var/lib/historian /secrets
COPY --from=build /out/historian /out/historian-datagen /usr/local/bin/
COPY deploy/historian.toml /etc/historian/historian.toml
COPY deploy/init.sh deploy/generator.sh /usr/local/lib/historian/
USER historian
WORKDIR /var/lib/historian
# HTTP API and Flight SQL (gRPC) share 8181; the PostgreSQL protocol listens on 5432.
EXPOSE 8181 5432
ENTRYPOINT ["historian"]
CMD ["serve", "--config", "/etc/historian/historian.toml"]
