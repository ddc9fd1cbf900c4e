#!/usr/bin/env bash
# Start the services the libvirt tests use, if they are not running yet.
# Idempotent. Works without systemd (containers, CI runners).
set -euo pipefail
running() { pgrep -x "$1" >/dev/null 2>&1; }
start() {
    local name=$1
    if running "$name"; then return 0; fi
    if command -v systemctl >/dev/null 2>&1 && systemctl is-system-running >/dev/null 2>&1; then
        systemctl start "$name" && return 0
    fi
    "/usr/sbin/$name" --daemon
}
start virtlogd
start libvirtd
for _ in $(seq 50); do
    [ -S /var/run/libvirt/libvirt-sock ] && exit 0
    sleep 0.1
done
echo "libvirtd did not create /var/run/libvirt/libvirt-sock" >&2
exit 1
