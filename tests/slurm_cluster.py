"""A throwaway Slurm cluster for tests: one node on this host, or several nodes in namespaces.

`SlurmCluster` writes a self-contained configuration under a work directory, starts a private
munged, slurmctld and one slurmd per node in the foreground (each a child of this process, PID
recorded) and stops exactly those processes again. Nodes declare more CPUs and memory than the
machine has (`SlurmdParameters=config_overrides`) and fake GPUs (gres files that are symlinks to
/dev/null), so a two-core machine can schedule multi-task "GPU" jobs next to CPU jobs.

With `nodes=1` (the default) the node is this host (`slurmd -N $(hostname -s)`, 127.0.0.1).
With `nodes=N > 1` each slurmd runs in a network and UTS namespace of its own, so N daemons can
share one machine as N hosts would (Debian's Slurm is built without `--enable-multiple-slurmd`):

    host namespace: slurmctld, munged, clients   bridge cfsl-br  10.213.k.1/24
      netns cfsl-cfnode1 (hostname cfnode1): slurmd   eth0  10.213.k.11  <- veth cfsl-cfnode1
      netns cfsl-cfnode2 (hostname cfnode2): slurmd   eth0  10.213.k.12  <- veth cfsl-cfnode2

The subnet is the first 10.213.k.0/24 that no address or route of the host overlaps. The
namespaces have no default route: the only traffic is between the nodes and the controller.
/etc/hosts maps each node name to its address while the cluster runs, so anything started on a
node (job steps inherit the slurmd's namespaces) resolves the node names as on a real cluster:
Lightning's MASTER_ADDR (the first name of SLURM_NODELIST) and Gloo's interface (the address of
the node's own hostname) then lie on the bridge. The munge socket is a file, which is reachable
from every network namespace.

While it runs, /etc/slurm/slurm.conf and /etc/slurm/gres.conf are symlinks to its files: Snakemake's
jobstep removes SLURM_CONF before running a rule, so an `srun` inside a job only finds the
configuration there. Files found there are moved aside and put back by `stop()`. A lock file
keeps two clusters (two pytest sessions) from running at once. Whatever a test process killed
before its `stop()` left behind (job steps, /etc/slurm links, /etc/hosts lines, namespaces,
links) is removed by the next `start()`, or by `remove_leftovers()`.

Needs root and Debian's `slurmctld slurmd slurm-client munge` packages, plus `iproute2` for
several nodes (`.ci/install_slurm.sh`). No pytest dependency: tests wrap it in a fixture.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar

__all__ = [
    "SYSTEM_CONF_DIR",
    "NamespaceError",
    "SlurmCluster",
    "SlurmClusterError",
    "available",
    "remove_leftovers",
]

SYSTEM_CONF_DIR = Path("/etc/slurm")
HOSTS_FILE = Path("/etc/hosts")
LOCK_FILE = Path("/run/cellfoundry-slurm-test.lock")
_BINARIES = ("munged", "slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "squeue", "scontrol")
# Set in the daemons' environment; slurmstepd inherits it, which lets stop() find job steps
# that outlived their slurmd without matching processes by name.
_MARKER_VAR = "CELLFOUNDRY_TEST_SLURM"
_HEADER = "# Written by tests/slurm_cluster.py"
_MUNGE_PREFIX = "cellfoundry-munge-"
# Names of the network namespaces and host-side links of a multi-node cluster (at most 15
# characters for a link). Fixed, not per cluster: the lock allows one cluster at a time, and
# leftovers of a killed one are found by name.
_NET_PREFIX = "cfsl-"
_BRIDGE = f"{_NET_PREFIX}br"
_SUBNETS = [ipaddress.ip_network(f"10.213.{k}.0/24") for k in range(256)]
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUTS = 0x04000000
_LIBC = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


class SlurmClusterError(RuntimeError):
    """The test cluster could not be started or did not behave as expected."""


class NamespaceError(SlurmClusterError):
    """Network or UTS namespaces (or the links between them) cannot be made on this machine."""


def available() -> bool:
    """Whether a test cluster can be started here: Slurm and munge installed, running as root."""
    return os.geteuid() == 0 and all(shutil.which(b) for b in _BINARIES)


class SlurmCluster:
    """A Slurm cluster on this machine for tests: the controller, and one or more nodes.

    Parameters
    ----------
    workdir
        Directory for configuration, state, spool and logs. Created if missing.
    nodes
        Number of nodes. One: this host itself. More: `cfnode1`, `cfnode2`, ..., each a slurmd
        in its own network and UTS namespace (see the module docstring); raises
        `NamespaceError` where namespaces or their links cannot be made.
    cpus
        CPUs each node declares; may exceed the machine's cores.
    gpus
        Fake GPUs (`gres gpu`) each node declares. Jobs that ask for them get
        `CUDA_VISIBLE_DEVICES`, nothing else.
    memory_mb
        Memory each node declares; may exceed the machine's memory.
    partitions
        Partition names, each with all nodes. The first is the default.
    min_job_age
        Seconds a finished job stays visible to `squeue` and `scontrol`. Snakemake's slurm
        executor polls with `squeue` only if this is at least three times its initial status
        check interval; otherwise it falls back to `sacct`, which needs slurmdbd.
    kill_wait
        Seconds between SIGTERM and SIGKILL when a job is cancelled, requeued or times out.
    requeue_delay
        Seconds a requeued job waits before it may start again (`AuthInfo=cred_expire`, default
        120 s). It is also the lifetime of job step credentials, so keep it at 10 or more.
    lock_timeout
        Seconds to wait for another test cluster on this machine to stop.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        nodes: int = 1,
        cpus: int = 8,
        gpus: int = 4,
        memory_mb: int = 16000,
        partitions: tuple[str, ...] = ("debug", "gpu"),
        min_job_age: int = 600,
        kill_wait: int = 2,
        requeue_delay: int = 10,
        lock_timeout: float = 1800,
    ) -> None:
        if not partitions:
            raise ValueError("at least one partition is needed")
        if nodes < 1:
            raise ValueError("at least one node is needed")
        self.workdir = Path(workdir).resolve()
        self.cpus = cpus
        self.gpus = gpus
        self.memory_mb = memory_mb
        self.partitions = partitions
        self.min_job_age = min_job_age
        self.kill_wait = kill_wait
        self.requeue_delay = requeue_delay
        self.lock_timeout = lock_timeout
        self.host = socket.gethostname().split(".")[0]
        self.namespaced = nodes > 1
        self.nodes = [f"cfnode{i + 1}" for i in range(nodes)] if self.namespaced else [self.host]
        self.node = self.nodes[0]
        # Node name -> address; the controller's address. Set when the network is made.
        self.addresses: dict[str, str] = {}
        self.controller_address = "127.0.0.1"
        self.token = uuid.uuid4().hex[:12]

        self.conf = self.workdir / "etc" / "slurm.conf"
        self.gres_conf = self.workdir / "etc" / "gres.conf"
        self.log_dir = self.workdir / "log"
        # munged refuses a key, socket or seed under directories it cannot traverse (pytest's
        # tmp dirs are 0700 root), so its files live in a private directory under /run.
        self.munge_dir: Path | None = None

        self._procs: dict[str, subprocess.Popen] = {}
        self._stderr: list[IO[str]] = []
        self._backups: dict[Path, Path | None] = {}
        self._hosts_lines: list[str] = []
        self._network = False
        self._lock: IO[str] | None = None
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> SlurmCluster:
        """Write the configuration, start munged, slurmctld and the slurmds, wait for idle nodes."""
        if self._started:
            return self
        if not available():
            raise SlurmClusterError(
                "a Slurm test cluster needs root and the slurm and munge binaries "
                f"({', '.join(_BINARIES)}); run .ci/install_slurm.sh"
            )
        self._started = True
        try:
            self._acquire_lock()
            # With the lock held, anything of another test cluster is a leftover of a test
            # process that died without stop() (its daemons die with it, the rest does not).
            _remove_leftovers()
            if self.namespaced:
                self._make_network()
            else:
                self._ensure_hostname_resolves()
            self._write_config()
            self._install_system_config()
            self._start_munge()
            self._start_daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait_for(self._controller_up, timeout, "slurmctld to answer", "slurmctld")
            for node in self.nodes:
                self._start_daemon(
                    self._slurmd(node),
                    ["slurmd", "-D", "-N", node, "-f", str(self.conf)],
                    enter=self._enter_node(node) if self.namespaced else None,
                )
            for node in self.nodes:
                self._wait_for(
                    lambda node=node: self.node_state(node) == "IDLE",
                    timeout,
                    f"node {node} to become idle",
                    self._slurmd(node),
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30) -> None:
        """Cancel all jobs, stop the daemons this object started, remove what it made."""
        if not self._started:
            return
        try:
            ctld = self._procs.get("slurmctld")
            if ctld is not None and ctld.poll() is None:
                self.cancel_all_jobs(timeout=timeout)
        finally:
            for name in [*map(self._slurmd, self.nodes), "slurmctld", "munged"]:
                proc = self._procs.pop(name, None)
                if proc is not None:
                    _terminate(proc, timeout=10)
            _kill_marked_steps(f"{_MARKER_VAR}={self.token}".encode(), exact=True)
            for f in self._stderr:
                f.close()
            self._stderr.clear()
            self._restore_system_files()
            if self._network:
                _remove_network()
                self._network = False
            if self.munge_dir is not None:
                shutil.rmtree(self.munge_dir, ignore_errors=True)
                self.munge_dir = None
            self._release_lock()
            self._started = False

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pids(self) -> dict[str, int]:
        """PIDs of the running daemons this object started (`slurmd` or `slurmd-<node>`)."""
        return {name: p.pid for name, p in self._procs.items() if p.poll() is None}

    # -- queries ---------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The current environment plus SLURM_CONF pointing at this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster."""
        return subprocess.run(
            list(args), env=self.env(), check=check, capture_output=True, text=True, timeout=60
        )

    def squeue(self, *, all_states: bool = True) -> list[dict[str, str]]:
        """Jobs with `id`, `name`, `state`, `partition`, `reason`.

        With `all_states`, finished jobs too (for `min_job_age` seconds after they end).
        """
        fields = ("id", "name", "state", "partition", "reason")
        args = ["squeue", "--noheader", "--format=%i|%j|%T|%P|%r"]
        if all_states:
            args.append("--states=all")
        out = self.run(*args).stdout
        return [dict(zip(fields, line.split("|", 4), strict=True)) for line in out.splitlines()]

    def job(self, job_id: str | int) -> dict[str, str]:
        """`scontrol show job` as a dict: `JobState`, `Restarts`, `NumTasks`, `NodeList`, ..."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return dict(re.findall(r"(\S+?)=(\S*)", out))

    def job_state(self, job_id: str | int) -> str:
        """The job's state, e.g. `PENDING`, `RUNNING`, `COMPLETED`, `FAILED`."""
        return self.job(job_id)["JobState"]

    def node_state(self, node: str | None = None) -> str:
        """A node's state (the first node's by default): `IDLE`, `MIXED`, `ALLOCATED`, ..."""
        node = node or self.node
        out = self.run("scontrol", "show", "node", "--oneliner", node).stdout
        match = re.search(r"\bState=(\S+)", out)
        if match is None:
            raise SlurmClusterError(f"no State in `scontrol show node {node}`: {out!r}")
        return match.group(1)

    def wait_until_idle(self, timeout: float = 60) -> None:
        """Wait until no job is pending, running or completing and every node is idle."""

        def idle() -> bool:
            return not self.squeue(all_states=False) and all(
                self.node_state(n) == "IDLE" for n in self.nodes
            )

        self._wait_for(idle, timeout, "the cluster to become idle", "slurmctld")

    def wait_for_job(self, job_id: str | int, states: tuple[str, ...], timeout: float = 60) -> str:
        """Wait until the job reaches one of `states`; return that state."""
        seen: list[str] = []

        def reached() -> bool:
            seen.append(self.job_state(job_id))
            return seen[-1] in states

        self._wait_for(reached, timeout, f"job {job_id} to reach {states}", "slurmctld")
        return seen[-1]

    def cancel_all_jobs(self, timeout: float = 30) -> None:
        """Cancel every pending or running job and wait until they are gone."""
        with contextlib.suppress(subprocess.SubprocessError):
            active = self.squeue(all_states=False)
            if not active:
                return
            self.run("scancel", *[j["id"] for j in active], check=False)
            deadline = time.monotonic() + timeout
            while self.squeue(all_states=False) and time.monotonic() < deadline:
                time.sleep(0.5)

    def log(self, daemon: str, lines: int = 40) -> str:
        """The last lines of a daemon's log: `slurmctld`, `munged`, `slurmd` (the first node's)
        or `slurmd-<node>`."""
        if daemon == "munged":
            return _tail(self.log_dir / "munged.stderr", lines)
        if daemon == "slurmd":
            daemon = self._slurmd(self.node)
        return _tail(self.log_dir / f"{daemon}.log", lines)

    # -- internals -------------------------------------------------------------------------

    def _slurmd(self, node: str) -> str:
        """The daemon's name in `pids` and logs: `slurmd` on one node, else `slurmd-<node>`."""
        return f"slurmd-{node}" if self.namespaced else "slurmd"

    def _acquire_lock(self) -> None:
        self._lock = open(LOCK_FILE, "a")  # noqa: SIM115 (held until stop)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SlurmClusterError(
                        f"another Slurm test cluster holds {LOCK_FILE} "
                        f"(waited {self.lock_timeout:.0f} s)"
                    ) from None
                time.sleep(1)

    def _release_lock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _add_hosts_line(self, address: str, name: str) -> None:
        line = f"{address} {name}  # {_MARKER_VAR} {self.token}\n"
        text = HOSTS_FILE.read_text()
        HOSTS_FILE.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line)
        self._hosts_lines.append(line)

    def _ensure_hostname_resolves(self) -> None:
        try:
            socket.gethostbyname(self.node)
        except OSError:
            # The daemons resolve their own node name; a container may not know it.
            self._add_hosts_line("127.0.0.1", self.node)

    def _make_network(self) -> None:
        """A bridge on a free private subnet, and per node a namespace joined to it by a veth
        pair; the node names resolve to their addresses through /etc/hosts."""
        if shutil.which("ip") is None:
            raise NamespaceError("the `ip` command is missing (apt-get install iproute2)")
        subnet = _free_subnet()
        hosts = list(subnet.hosts())
        self.controller_address = str(hosts[0])
        self.addresses = {node: str(hosts[10 + i]) for i, node in enumerate(self.nodes)}
        self._network = True  # from here on, stop() removes whatever exists of it
        prefix = subnet.prefixlen
        _ip("link", "add", _BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{self.controller_address}/{prefix}", "dev", _BRIDGE)
        _ip("link", "set", _BRIDGE, "up")
        for node, address in self.addresses.items():
            ns = _netns(node)
            _ip("netns", "add", ns)
            # The node side is created inside the namespace as eth0, as on a real host.
            _ip("link", "add", ns, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", ns, "master", _BRIDGE)
            _ip("link", "set", ns, "up")
            _ip("-n", ns, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self._add_hosts_line(address, node)
        # The steps a slurmd's start takes (see _enter_node), tried first on a throwaway thread:
        # a failure in a preexec_fn loses its reason.
        node = self.nodes[0]

        def become_node() -> str:
            _become(_netns_path(node), node)
            return socket.gethostname()

        try:
            hostname = _in_thread(become_node)
        except OSError as error:
            raise NamespaceError(
                f"cannot enter namespace {_netns(node)} as host {node}: {error}"
            ) from error
        if hostname != node:
            raise NamespaceError(f"a UTS namespace kept hostname {hostname!r}, not {node!r}")
        self._check_connectivity()

    def _check_connectivity(self) -> None:
        """Every node reaches the controller and every other node over TCP (a bridge can be
        filtered: br_netfilter with an iptables FORWARD policy of DROP, as Docker sets)."""
        places = {node: _netns_path(node) for node in self.nodes}
        places[f"controller ({self.host})"] = None
        addresses = {**self.addresses, f"controller ({self.host})": self.controller_address}
        for target, target_ns in places.items():
            server = _socket_in(target_ns)
            with server:
                server.bind((addresses[target], 0))
                server.listen()
                server.settimeout(5)
                for source, source_ns in places.items():
                    if source == target or source.startswith("controller"):
                        continue
                    client = _socket_in(source_ns)
                    with client:
                        client.settimeout(5)
                        try:
                            client.connect(server.getsockname())
                            server.accept()[0].close()
                        except OSError as error:
                            raise NamespaceError(
                                f"{source} cannot reach {target} at {addresses[target]} over "
                                f"bridge {_BRIDGE}: {error} (is bridged traffic filtered? see "
                                "/proc/sys/net/bridge/bridge-nf-call-iptables)"
                            ) from error

    def _enter_node(self, node: str) -> Callable[[], None]:
        """For Popen's preexec_fn: die with this process, then become host `node`."""

        def enter() -> None:
            _die_with_parent()
            _become(_netns_path(node), node)

        return enter

    def _write_config(self) -> None:
        w = self.workdir
        for d in (w / "etc", self.log_dir, w / "state", w / "gpus"):
            d.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (w / "spool" / node).mkdir(parents=True, exist_ok=True)
        for i in range(self.gpus):
            link = w / "gpus" / f"nvidia{i}"
            link.unlink(missing_ok=True)
            # A gres File must exist and be a device: plain files are rejected, and GPUs
            # without files are dropped. /dev/null passes both checks.
            link.symlink_to("/dev/null")

        self.munge_dir = Path(tempfile.mkdtemp(prefix=_MUNGE_PREFIX, dir="/run"))
        # One slurmd port for all nodes: each node has its own network namespace.
        ctld_port, slurmd_port = _free_port(), _free_port()
        node_list = ",".join(self.nodes)
        partitions = "\n".join(
            f"PartitionName={name} Nodes={node_list} Default={'YES' if i == 0 else 'NO'} "
            "MaxTime=INFINITE State=UP"
            for i, name in enumerate(self.partitions)
        )
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        node_lines = "\n".join(
            f"NodeName={node} NodeAddr={self.addresses.get(node, '127.0.0.1')} "
            f"NodeHostname={node} CPUs={self.cpus} Boards=1 SocketsPerBoard=1 "
            f"CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory={self.memory_mb}{gres} "
            "State=UNKNOWN"
            for node in self.nodes
        )
        # %n: the node's name, so that the slurmds of several nodes keep their files apart.
        slurmd_file = "slurmd-%n" if self.namespaced else "slurmd"
        self.conf.write_text(
            f"""\
{_HEADER} ({_MARKER_VAR}={self.token}); removed when that test cluster stops.
ClusterName=cellfoundry-test
SlurmctldHost={self.host}({self.controller_address})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A private munged; cred_expire is also how long a requeued job waits before it may start.
AuthInfo=socket={self.munge_dir}/munge.socket,cred_expire={self.requeue_delay}
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool/%n
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/{slurmd_file}.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/{slurmd_file}.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: 22.05 has no CgroupPlugin=disabled, and containers rarely allow them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
# Submissions and job ends trigger scheduling; a requeued job whose begin time has passed
# waits for the periodic pass (default every 60 s).
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
# Finished jobs stay visible to squeue and scontrol this long.
MinJobAge={self.min_job_age}
KillWait={self.kill_wait}
InactiveLimit=0
ReturnToService=2
JobRequeue=1
SlurmdTimeout=300
# Nodes may declare more CPUs and memory than the machine has.
SlurmdParameters=config_overrides
GresTypes=gpu
{node_lines}
{partitions}
"""
        )
        gres_lines = ["AutoDetect=off"]
        if self.gpus:
            files = f"nvidia[0-{self.gpus - 1}]" if self.gpus > 1 else "nvidia0"
            gres_lines.append(f"Name=gpu File={w}/gpus/{files}")
        self.gres_conf.write_text(f"{_HEADER}\n" + "\n".join(gres_lines) + "\n")

    def _install_system_config(self) -> None:
        """Point /etc/slurm/{slurm,gres}.conf at this cluster's files, keeping backups."""
        SYSTEM_CONF_DIR.mkdir(parents=True, exist_ok=True)
        for src in (self.conf, self.gres_conf):
            target = SYSTEM_CONF_DIR / src.name
            _recover_stale(target)
            backup = None
            if target.exists() or target.is_symlink():
                backup = target.with_name(f"{target.name}.{_MARKER_VAR}.bak")
                target.rename(backup)
            self._backups[target] = backup
            target.symlink_to(src)

    def _restore_system_files(self) -> None:
        for target, backup in self._backups.items():
            if target.is_symlink() and Path(os.readlink(target)).parent == self.conf.parent:
                target.unlink()
            if backup is not None and not (target.exists() or target.is_symlink()):
                backup.rename(target)
        self._backups.clear()
        if self._hosts_lines:
            text = HOSTS_FILE.read_text()
            for line in self._hosts_lines:
                text = text.replace(line, "", 1)
            HOSTS_FILE.write_text(text)
            self._hosts_lines.clear()

    def _daemon_env(self) -> dict[str, str]:
        env = self.env()
        env[_MARKER_VAR] = self.token
        return env

    def _popen(
        self, name: str, args: list[str], enter: Callable[[], None] | None = None, **kwargs
    ) -> None:
        stderr = open(self.log_dir / f"{name}.stderr", "w")  # noqa: SIM115 (closed by stop)
        self._stderr.append(stderr)
        self._procs[name] = subprocess.Popen(
            args,
            env=self._daemon_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=enter or _die_with_parent,
            **kwargs,
        )

    def _start_munge(self) -> None:
        assert self.munge_dir is not None
        munge = pwd.getpwnam("munge")
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        os.chmod(self.munge_dir, 0o700)
        os.chmod(key, 0o400)
        socket_path = self.munge_dir / "munge.socket"
        self._popen(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={socket_path}",
                f"--key-file={key}",
                f"--pid-file={self.munge_dir}/munged.pid",
                f"--seed-file={self.munge_dir}/munged.seed",
            ],
            user=munge.pw_uid,
            group=munge.pw_gid,
            extra_groups=[],
        )
        self._wait_for(socket_path.exists, 20, "munged to create its socket", "munged")

    def _start_daemon(
        self, name: str, args: list[str], enter: Callable[[], None] | None = None
    ) -> None:
        self._popen(name, args, enter)

    def _controller_up(self) -> bool:
        return self.run("scontrol", "ping", check=False).returncode == 0

    def _wait_for(
        self, predicate: Callable[[], bool], timeout: float, what: str, daemon: str
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmClusterError(
                        f"{name} exited with status {proc.returncode} while waiting for {what}.\n"
                        f"{self._diagnostics(name)}"
                    )
            with contextlib.suppress(subprocess.SubprocessError, SlurmClusterError):
                if predicate():
                    return
            if time.monotonic() > deadline:
                raise SlurmClusterError(
                    f"timed out after {timeout:.0f} s waiting for {what}.\n"
                    f"{self._diagnostics(daemon)}"
                )
            time.sleep(0.2)

    def _diagnostics(self, daemon: str) -> str:
        parts = [f"--- {daemon} log ({self.log_dir}) ---", self.log(daemon)]
        stderr = self.log_dir / f"{daemon}.stderr"
        if daemon != "munged" and stderr.exists() and stderr.stat().st_size:
            parts += [f"--- {daemon} stderr ---", _tail(stderr)]
        return "\n".join(parts)


def remove_leftovers() -> None:
    """Remove what test clusters killed before their `stop()` left on this machine: job steps,
    /etc/slurm links, /etc/hosts lines, namespaces and links, munge directories.

    Waits for a running test cluster to stop first (the lock); `start()` calls it anyway.
    """
    with open(LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _remove_leftovers()
            for name in ("slurm.conf", "gres.conf"):
                _recover_stale(SYSTEM_CONF_DIR / name)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers() -> None:
    """`remove_leftovers` without the lock (the caller holds it)."""
    _kill_marked_steps(f"{_MARKER_VAR}=".encode())
    for stale in Path("/run").glob(f"{_MUNGE_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if HOSTS_FILE.is_file():
        text = HOSTS_FILE.read_text()
        kept = "".join(
            line for line in text.splitlines(keepends=True) if f"# {_MARKER_VAR} " not in line
        )
        if kept != text:
            HOSTS_FILE.write_text(kept)
    _remove_network()


def _remove_network() -> None:
    """Delete the namespaces and links of a multi-node cluster (ours by name), if any."""
    if shutil.which("ip") is None:
        return
    netns = Path("/run/netns")
    for ns in sorted(netns.glob(f"{_NET_PREFIX}*")) if netns.is_dir() else []:
        # A veth pair dies with its namespace; the namespace dies with its last process.
        subprocess.run(["ip", "netns", "delete", ns.name], capture_output=True, check=False)
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=False
    ).stdout
    for name in re.findall(rf"^\d+: ({re.escape(_NET_PREFIX)}[^:@\s]+)", links, re.MULTILINE):
        subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)


def _netns(node: str) -> str:
    """The network namespace of a node, also the name of its veth on the host side."""
    return f"{_NET_PREFIX}{node}"


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NamespaceError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


def _free_subnet() -> ipaddress.IPv4Network:
    """The first candidate /24 that no address or route of this host overlaps."""
    addrs = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True)
    routes = subprocess.run(
        ["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True
    )
    used = [ipaddress.ip_interface(a).network for a in re.findall(r"inet (\S+)", addrs.stdout)]
    for line in routes.stdout.splitlines():
        # The destination: `10.0.0.0/8 dev ...`, `local 127.0.0.1 dev lo ...`
        for word in line.split()[:2]:
            with contextlib.suppress(ValueError):
                net = ipaddress.ip_network(word, strict=False)
                if net.prefixlen:
                    used.append(net)
                break
    for candidate in _SUBNETS:
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise NamespaceError("no free /24 in 10.213.0.0/16 for the test cluster's bridge")


def _netns_path(node: str) -> str:
    return f"/run/netns/{_netns(node)}"


def _become(netns: str, hostname: str) -> None:
    """Join a network namespace, and a new UTS namespace named `hostname` (calling thread)."""
    fd = os.open(netns, os.O_RDONLY)
    try:
        _check(_LIBC.setns(fd, _CLONE_NEWNET), f"setns({netns}, CLONE_NEWNET)")
    finally:
        os.close(fd)
    _check(_LIBC.unshare(_CLONE_NEWUTS), "unshare(CLONE_NEWUTS)")
    name = hostname.encode()
    _check(_LIBC.sethostname(name, len(name)), "sethostname")


def _in_thread(function: Callable[[], T]) -> T:
    """Run `function` on a thread of its own, which ends with it. setns and unshare change the
    calling thread's namespaces only: this process's other threads keep theirs."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, function()))
        except BaseException as error:  # re-raised on the caller's thread
            result.append((False, error))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def _socket_in(netns: str | None) -> socket.socket:
    """A TCP socket of a network namespace (None: this process's own)."""
    if netns is None:
        return socket.socket()

    def make() -> socket.socket:
        fd = os.open(netns, os.O_RDONLY)
        try:
            _check(_LIBC.setns(fd, _CLONE_NEWNET), f"setns({netns}, CLONE_NEWNET)")
        finally:
            os.close(fd)
        return socket.socket()

    try:
        return _in_thread(make)
    except OSError as error:
        raise NamespaceError(f"cannot open a socket in {netns}: {error}") from error


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _recover_stale(target: Path) -> None:
    """Undo what a test cluster killed before its stop() left in /etc/slurm.

    Only called with the lock held, so no other test cluster is running.
    """
    backup = target.with_name(f"{target.name}.{_MARKER_VAR}.bak")
    if target.is_symlink():
        link = os.readlink(target)
        try:
            ours = target.read_text().startswith(_HEADER)
        except OSError:  # dangling: ours if it points into a gone work directory's etc/
            ours = link.endswith(f"/etc/{target.name}") and not link.startswith("/etc/")
        if ours:
            target.unlink()
    if backup.exists() and not (target.exists() or target.is_symlink()):
        backup.rename(target)


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM the daemon if this process dies without calling stop()."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def _terminate(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _kill_marked_steps(marker: bytes, *, exact: bool = False) -> None:
    """SIGKILL slurmstepd processes whose environment has `marker`, and all their descendants.

    The daemons' marker variable is inherited by slurmstepd, not by the job's own processes,
    which are therefore found as descendants. Normally there are none: stop() cancels all jobs
    first.
    """
    children: dict[int, list[int]] = {}
    steps = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        pid = int(proc_dir.name)
        try:
            stat = (proc_dir / "stat").read_text()
            # The command name may contain spaces; the parent PID follows its closing paren.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(pid)
            if not stat.split(" (", 1)[1].startswith("slurmstepd"):
                continue
            environ = (proc_dir / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if any(v == marker if exact else v.startswith(marker) for v in environ):
            steps.append(pid)
    doomed: list[int] = []
    todo = list(steps)
    while todo:
        pid = todo.pop()
        doomed.append(pid)
        todo.extend(children.get(pid, []))
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
