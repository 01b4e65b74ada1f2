#!/usr/bin/env bash
# Install Slurm (controller, node daemon, client tools), munge and iproute2 on Debian 12, for
# tests/slurm_cluster.py (iproute2's `ip` makes the network namespaces of a two-node test
# cluster). Idempotent: does nothing when slurmctld and ip are already installed. Needs root.
set -euo pipefail

if [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/ip ]; then
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
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge iproute2
echo "installed: $(/usr/sbin/slurmctld -V)"
