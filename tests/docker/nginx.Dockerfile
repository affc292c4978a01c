# A stand-in for the official nginx:1.27-bookworm image, for tests on a
# machine without a registry: Debian's nginx (1.22, with the HTTP/2 and
# gRPC modules) on the local debian:bookworm-slim, with what deploy/compose
# relies on from the official image: /etc/nginx/nginx.conf as the main
# configuration, /etc/nginx/templates/*.template turned into
# /etc/nginx/conf.d/*.conf by the entrypoint (envsubst of the variables
# that are set), logs to stdout and stderr, `nginx -g 'daemon off;'`.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
 && apt-get update \
 && apt-get install -y --no-install-recommends nginx gettext-base \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d /etc/nginx/sites-enabled/* \
 && ln -sf /dev/stdout /var/log/nginx/access.log \
 && ln -sf /dev/stderr /var/log/nginx/error.log
COPY nginx-entrypoint.sh /docker-entrypoint.sh
ENTRYPOINT ["/docker-entrypoint.sh"]
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
