#!/usr/bin/env bash
# Kept for old instructions: cluster/local/down.sh stops what cluster/local/up.sh started.
exec bash "$(dirname "$0")/local/down.sh"
