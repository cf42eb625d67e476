#!/usr/bin/env bash
# Container health check without curl: GET /healthz on the admin endpoint using bash's
# /dev/tcp, healthy only on an HTTP 200 status line. Usage: healthcheck.sh [HOST] [PORT].
set -euo pipefail
host=${1:-127.0.0.1}
port=${2:-9583}
exec 3<>"/dev/tcp/${host}/${port}"
printf 'GET /healthz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$host" >&3
IFS= read -r -t 3 status <&3
[[ $status =~ ^HTTP/1\.[01]\ 200[[:space:]] ]]
