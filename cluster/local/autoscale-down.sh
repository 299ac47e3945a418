#!/usr/bin/env bash
# Stop the cluster of cluster/local/autoscale-up.sh: the processes of the session it started
# (the head, its autoscaler and the worker nodes it launched), by their ids; never `ray stop`.
set -euo pipefail
port=${RAY_PORT:-6390}
state=${IMM_AUTOSCALE_DIR:-/tmp/imm-autoscale-$(id -u)-$port}
if [ ! -e "$state/head.pid" ]; then
  echo "no autoscaling cluster recorded in $state"
  exit 0
fi
sid=$(cat "$state/head.pid")  # setsid made the head's process the leader of a new session
members() { ps -e -o pid= -o sid= | awk -v sid="$sid" '$2 == sid && $1 != sid {print $1}'; }
kill -TERM "$sid" 2>/dev/null || true  # `ray start --block` stops its node's processes on SIGTERM
for _ in $(seq 1 10); do
  kill -0 "$sid" 2>/dev/null || break
  sleep 1
done
# The worker nodes' processes are the autoscaler's children, not the head's: they outlive it.
left=$(members)
if [ -n "$left" ]; then
  echo "killing $(echo "$left" | wc -w) leftover process(es) of the cluster's session $sid" >&2
  kill -KILL $left 2>/dev/null || true
fi
kill -KILL "$sid" 2>/dev/null || true
for _ in $(seq 1 30); do
  [ -z "$(members)" ] && break
  sleep 1
done
rm -f "$state/head.pid"
echo "autoscaling cluster in $state stopped"
