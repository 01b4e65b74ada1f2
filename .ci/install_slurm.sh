#!/usr/bin/env bash
# Install a single-node Slurm (controller, node daemon, client tools) and munge on Debian 12,
# for tests/slurm_cluster.py. Idempotent: does nothing when slurmctld is already installed.
# Needs root.
set -euo pipefail

if command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ]; then
    echo "slurm already installed: $(/usr/sbin/slurmctld -V)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install_slurm.sh must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Keep the packages' maintainer scripts from starting munge/slurm services: the test harness
# starts and stops its own daemons with its own configuration.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
echo "installed: $(/usr/sbin/slurmctld -V)"
