#!/usr/bin/env bash
# Kept for old instructions: the local cluster is cluster/local/up.sh [N] (here N=0, the head only).
exec bash "$(dirname "$0")/local/up.sh" "${1:-0}"
