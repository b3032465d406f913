# Prometheus from Debian's package, for a machine that cannot pull `prom/prometheus` (no registry,
# air-gapped site). scripts/compose_smoke.sh builds it on BASE (a local Debian image) and names it in
# RPO_PROMETHEUS_IMAGE. Like the official image: the entrypoint is the server, its data lives in /prometheus.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus && chown prometheus:prometheus /prometheus
USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
