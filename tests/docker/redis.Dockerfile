# A stand-in for the official redis:7.2-bookworm image, for tests on a
# machine without a registry: Debian's redis-server on the local
# debian:bookworm-slim, run the way deploy/compose runs the official image
# (command `redis-server [config] [options]`, data in /data, user redis
# with the official image's uid 999, which owns the mounted redis.conf).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN groupadd --system --gid 999 redis \
 && useradd --system --uid 999 --gid redis --home-dir /data --no-create-home --shell /usr/sbin/nologin redis \
 && printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
 && apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
 && mkdir /data && chown redis:redis /data
WORKDIR /data
VOLUME /data
USER redis
CMD ["redis-server"]
