"""A throwaway Slurm cluster on this machine for the launcher tests (root only).

Installs ``slurm-wlm`` and ``munge`` with apt if ``sbatch`` is missing, writes a ``slurm.conf``
into a temporary folder (own ports, state and spool), starts munged (unless one already answers),
slurmctld and one slurmd per node in the foreground as children of the test process, and stops
exactly those on ``stop()``. Client commands find the cluster through ``SLURM_CONF``
(``cluster.env``). The first node is named ``hostname -s``; with ``nodes=2`` a second slurmd on
the same host (``slurmd -N``, its own port) is a second node, so a ``--nodes=2`` job really runs
one ``srun`` task per node.

By hand (debugging the sbatch scripts)::

    .venv/bin/python -m tests.slurm_cluster /tmp/slurm   # prints the SLURM_CONF to export; Ctrl-C stops it
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET_DIR = Path("/run/munge")
APT_TIMEOUT_S = 900
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 60


class SlurmUnavailable(Exception):
    """Slurm cannot be set up on this machine (not root, no apt): a reason to skip, not a failure."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout_s: float, interval_s: float = 0.5, log=None):
    """Polls ``check()`` until it returns something truthy; raises TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{log()}" if log else ""
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}{extra}")
        time.sleep(interval_s)


def ensure_installed() -> None:
    """apt-get installs slurm-wlm and munge if ``sbatch`` is missing (a fresh CI machine)."""
    if shutil.which("sbatch") and shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
    ):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
        if res.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
            )


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return f"--- {path}:\n{path.read_text(errors='replace')[-n:]}"
    except OSError:
        return f"--- {path}: (none)"


class SlurmCluster:
    """``nodes`` nodes at 127.0.0.1, each with every CPU of this machine; one partition ``test``."""

    def __init__(self, root: Path, nodes: int = 1):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [self.host] + [f"{self.host}-{i + 1}" for i in range(1, nodes)]
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---- set-up -------------------------------------------------------------------------------
    def write_config(self) -> None:
        for sub in ("state", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        cpus = os.cpu_count() or 2
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={cpus}"
            for n in self.nodes
        )
        self.conf.write_text(
            f"""\
ClusterName=splitft-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
# No cgroups inside containers/VMs: track job processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
# A requeued job becomes eligible by time, not by an event: look at the queue every 2 s, not 60.
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=60
{nodes}
PartitionName=test Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        )
        (self.root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")

    def _munge_works(self) -> bool:
        try:
            cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
            if cred.returncode != 0:
                return False
            return (
                subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode
                == 0
            )
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _start_munge(self) -> None:
        if self._munge_works():  # a system munged: use it, and leave it running
            return
        if not MUNGE_KEY.is_file():
            subprocess.run(["mungekey", "--create", f"--keyfile={MUNGE_KEY}"], check=True, timeout=30)
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
        for d in (MUNGE_SOCKET_DIR, Path("/var/lib/munge"), Path("/var/log/munge")):
            d.mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        MUNGE_SOCKET_DIR.chmod(0o755)
        self._spawn("munged", ["munged", "--foreground"], user="munge", group="munge", extra_groups=[])
        wait_for("munged to answer", self._munge_works, START_TIMEOUT_S, log=self.logs)

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        log = (self.root / "log" / f"{name}.out").open("w")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True, **kw
        )
        log.close()

    def node_states(self) -> list[str]:
        res = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True, timeout=30
        )
        return res.stdout.split() if res.returncode == 0 else []

    def start(self) -> SlurmCluster:
        ensure_installed()
        self.write_config()
        try:
            self._start_munge()
            # -D: foreground, so the daemons are our children and stop() can end exactly them;
            # -i/-c: ignore any saved state (the folder is new anyway).
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            wait_for("slurmctld to answer", self.node_states, START_TIMEOUT_S, log=self.logs)
            for node in self.nodes:
                (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-c", "-N", node, "-f", str(self.conf)])
            idle = ["idle"] * len(self.nodes)
            wait_for(
                "the nodes to be idle", lambda: self.node_states() == idle, START_TIMEOUT_S, log=self.logs
            )
        except BaseException:
            self.stop()
            raise
        return self

    # ---- use ----------------------------------------------------------------------------------
    def run(self, *cmd: str, timeout_s: float = 30, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout_s, **kw
        )

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); {} once it is forgotten."""
        res = self.run("scontrol", "show", "job", "-o", job_id)
        if res.returncode != 0:
            return {}
        fields = {}
        for item in res.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def logs(self) -> str:
        return "\n".join(_tail(p) for p in sorted((self.root / "log").glob("*")))

    # ---- tear-down ----------------------------------------------------------------------------
    def _jobs_gone(self) -> bool:
        q = self.run("squeue", "-h", "-o", "%i")
        return q.returncode == 0 and not q.stdout.strip()

    def stop(self) -> None:
        """Cancels every job, waits for their processes to end, then stops what start() started."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                q = self.run("squeue", "-h", "-o", "%i")
                if q.stdout.strip():
                    self.run("scancel", *q.stdout.split())
                wait_for("cancelled jobs to end", self._jobs_gone, STOP_TIMEOUT_S)
            except (TimeoutError, subprocess.TimeoutExpired, OSError):
                pass  # stop the daemons anyway
        for name in [*(f"slurmd-{n}" for n in self.nodes), "slurmctld", "munged"]:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)


if __name__ == "__main__":
    import signal
    import sys

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill PID stops it cleanly too
    cluster = SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/splitft-slurm")).start()
    print(f"export SLURM_CONF={cluster.conf}  # kill {os.getpid()} to stop it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
