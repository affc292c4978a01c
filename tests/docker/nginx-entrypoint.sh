#!/bin/sh
# The part of the official nginx image's entrypoint that deploy/compose
# uses: before nginx starts, each /etc/nginx/templates/NAME.template becomes
# /etc/nginx/conf.d/NAME with the environment's variables substituted (only
# variables that are set, so nginx's own $variables stay).
set -eu
if [ "${1:-}" = nginx ] && [ -d /etc/nginx/templates ]; then
  defined=$(env | sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*/${\1}/p' | tr '\n' ' ')
  for template in /etc/nginx/templates/*.template; do
    [ -f "$template" ] || continue
    output=/etc/nginx/conf.d/$(basename "$template" .template)
    envsubst "$defined" <"$template" >"$output"
    echo "$0: wrote $output from $template" >&2
  done
fi
exec "$@"
