# Redis from Debian's package, for a machine that cannot pull `redis:7.2.5` (no registry, air-gapped site).
# scripts/compose_smoke.sh builds it on BASE (a local Debian image) and names it in RPO_REDIS_IMAGE. The
# compose file's command and healthcheck (redis-server, redis-cli) work with it as with the official image.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
