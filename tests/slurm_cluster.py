"""A throwaway single-node Slurm cluster for tests.

`SlurmCluster` writes a self-contained configuration under a work directory, starts a private
munged, slurmctld and slurmd in the foreground (each a child of this process, PID recorded) and
stops exactly those processes again. The node declares more CPUs and memory than the machine has
(`SlurmdParameters=config_overrides`) and fake GPUs (gres files that are symlinks to /dev/null), so
a two-core machine can schedule multi-task "GPU" jobs next to CPU jobs.

While it runs, /etc/slurm/slurm.conf and /etc/slurm/gres.conf are symlinks to its files: Snakemake's
jobstep removes SLURM_CONF before running a rule, so an `srun` inside a job only finds the
configuration there. Files found there are moved aside and put back by `stop()`. A lock file
keeps two clusters (two pytest sessions) from running at once.

Needs root and Debian's `slurmctld slurmd slurm-client munge` packages (`.ci/install_slurm.sh`).
No pytest dependency: tests wrap it in a fixture.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["SYSTEM_CONF_DIR", "SlurmCluster", "SlurmClusterError", "available"]

SYSTEM_CONF_DIR = Path("/etc/slurm")
LOCK_FILE = Path("/run/cellfoundry-slurm-test.lock")
_BINARIES = ("munged", "slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "squeue", "scontrol")
# Set in the daemons' environment; slurmstepd inherits it, which lets stop() find job steps
# that outlived their slurmd without matching processes by name.
_MARKER_VAR = "CELLFOUNDRY_TEST_SLURM"
_HEADER = "# Written by tests/slurm_cluster.py"
_MUNGE_PREFIX = "cellfoundry-munge-"


class SlurmClusterError(RuntimeError):
    """The test cluster could not be started or did not behave as expected."""


def available() -> bool:
    """Whether a test cluster can be started here: Slurm and munge installed, running as root."""
    return os.geteuid() == 0 and all(shutil.which(b) for b in _BINARIES)


class SlurmCluster:
    """A single-node Slurm cluster (controller and node on this machine) for tests.

    Parameters
    ----------
    workdir
        Directory for configuration, state, spool and logs. Created if missing.
    cpus
        CPUs the node declares; may exceed the machine's cores.
    gpus
        Fake GPUs (`gres gpu`) the node declares. Jobs that ask for them get
        `CUDA_VISIBLE_DEVICES`, nothing else.
    memory_mb
        Memory the node declares; may exceed the machine's memory.
    partitions
        Partition names, all on the one node. The first is the default.
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
        self.workdir = Path(workdir).resolve()
        self.cpus = cpus
        self.gpus = gpus
        self.memory_mb = memory_mb
        self.partitions = partitions
        self.min_job_age = min_job_age
        self.kill_wait = kill_wait
        self.requeue_delay = requeue_delay
        self.lock_timeout = lock_timeout
        self.node = socket.gethostname().split(".")[0]
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
        self._hosts_line: str | None = None
        self._lock: IO[str] | None = None
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> SlurmCluster:
        """Write the configuration, start munged, slurmctld and slurmd, wait for an idle node."""
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
            # With the lock held, steps of any other test cluster are leftovers of a test
            # process that died without stop() (its daemons die with it, its job steps do not).
            _kill_marked_steps(f"{_MARKER_VAR}=".encode())
            for stale in Path("/run").glob(f"{_MUNGE_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            self._ensure_hostname_resolves()
            self._write_config()
            self._install_system_config()
            self._start_munge()
            self._start_daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait_for(self._controller_up, timeout, "slurmctld to answer", "slurmctld")
            self._start_daemon("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
            self._wait_for(self._node_idle, timeout, f"node {self.node} to become idle", "slurmd")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30) -> None:
        """Cancel all jobs, stop the daemons this object started and restore system files."""
        if not self._started:
            return
        try:
            ctld = self._procs.get("slurmctld")
            if ctld is not None and ctld.poll() is None:
                self.cancel_all_jobs(timeout=timeout)
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                proc = self._procs.pop(name, None)
                if proc is not None:
                    _terminate(proc, timeout=10)
            _kill_marked_steps(f"{_MARKER_VAR}={self.token}".encode(), exact=True)
            for f in self._stderr:
                f.close()
            self._stderr.clear()
            self._restore_system_files()
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
        """PIDs of the running daemons this object started."""
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
        """`scontrol show job` as a dict: `JobState`, `Restarts`, `NumTasks`, `TresPerNode`, ..."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return dict(re.findall(r"(\S+?)=(\S*)", out))

    def job_state(self, job_id: str | int) -> str:
        """The job's state, e.g. `PENDING`, `RUNNING`, `COMPLETED`, `FAILED`."""
        return self.job(job_id)["JobState"]

    def node_state(self) -> str:
        """The node's state, e.g. `IDLE`, `MIXED`, `ALLOCATED`, `DOWN+NOT_RESPONDING`."""
        out = self.run("scontrol", "show", "node", "--oneliner", self.node).stdout
        match = re.search(r"\bState=(\S+)", out)
        if match is None:
            raise SlurmClusterError(f"no State in `scontrol show node {self.node}`: {out!r}")
        return match.group(1)

    def wait_until_idle(self, timeout: float = 60) -> None:
        """Wait until no job is pending, running or completing and the node is idle."""

        def idle() -> bool:
            return not self.squeue(all_states=False) and self.node_state() == "IDLE"

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
        """The last lines of a daemon's log: `slurmctld`, `slurmd` or `munged`."""
        name = "munged.stderr" if daemon == "munged" else f"{daemon}.log"
        return _tail(self.log_dir / name, lines)

    # -- internals -------------------------------------------------------------------------

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

    def _ensure_hostname_resolves(self) -> None:
        try:
            socket.gethostbyname(self.node)
        except OSError:
            # The daemons resolve their own node name; a container may not know it.
            self._hosts_line = f"127.0.0.1 {self.node}  # {_MARKER_VAR} {self.token}\n"
            with open("/etc/hosts", "a") as f:
                f.write(self._hosts_line)

    def _write_config(self) -> None:
        w = self.workdir
        for d in (w / "etc", self.log_dir, w / "state", w / "spool", w / "gpus"):
            d.mkdir(parents=True, exist_ok=True)
        for i in range(self.gpus):
            link = w / "gpus" / f"nvidia{i}"
            link.unlink(missing_ok=True)
            # A gres File must exist and be a device: plain files are rejected, and GPUs
            # without files are dropped. /dev/null passes both checks.
            link.symlink_to("/dev/null")

        self.munge_dir = Path(tempfile.mkdtemp(prefix=_MUNGE_PREFIX, dir="/run"))
        ctld_port, slurmd_port = _free_port(), _free_port()
        partitions = "\n".join(
            f"PartitionName={name} Nodes={self.node} Default={'YES' if i == 0 else 'NO'} "
            "MaxTime=INFINITE State=UP"
            for i, name in enumerate(self.partitions)
        )
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        self.conf.write_text(
            f"""\
{_HEADER} ({_MARKER_VAR}={self.token}); removed when that test cluster stops.
ClusterName=cellfoundry-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A private munged; cred_expire is also how long a requeued job waits before it may start.
AuthInfo=socket={self.munge_dir}/munge.socket,cred_expire={self.requeue_delay}
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd.log
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
# The node may declare more CPUs and memory than the machine has.
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} Boards=1 SocketsPerBoard=1 \
CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory={self.memory_mb}{gres} State=UNKNOWN
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
        if self._hosts_line is not None:
            hosts = Path("/etc/hosts")
            hosts.write_text(hosts.read_text().replace(self._hosts_line, "", 1))
            self._hosts_line = None

    def _daemon_env(self) -> dict[str, str]:
        env = self.env()
        env[_MARKER_VAR] = self.token
        return env

    def _popen(self, name: str, args: list[str], **kwargs) -> None:
        stderr = open(self.log_dir / f"{name}.stderr", "w")  # noqa: SIM115 (closed by stop)
        self._stderr.append(stderr)
        self._procs[name] = subprocess.Popen(
            args,
            env=self._daemon_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=_die_with_parent,
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

    def _start_daemon(self, name: str, args: list[str]) -> None:
        self._popen(name, args)

    def _controller_up(self) -> bool:
        return self.run("scontrol", "ping", check=False).returncode == 0

    def _node_idle(self) -> bool:
        return self.node_state() == "IDLE"

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
