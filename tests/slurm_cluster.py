"""A real two-node SLURM cluster for the test suite (Debian's slurmctld, slurmd, munge; run as root).

Each node is a ``slurmd`` in network, UTS and mount namespaces of its own: its own hostname (``n1``,
``n2``), its own address on a bridge the cluster creates (a private /24 only this cluster uses), and
a hosts file naming the nodes (bind-mounted over /etc/hosts inside the node only). The controller
listens on the bridge's own address. Everything is configured through ``SLURM_CONF`` in one temporary
directory, which both nodes see (the same host filesystem: the shared filesystem of a real cluster).
Nothing is written outside that directory except the namespaces and links, all removed by ``stop``.
Facts about SLURM this relies on: ../shared/docs/slurm.md and docs/cluster.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")
TOOLS = ("ip", "nsenter", "unshare", "mount")
NETNS = Path("/var/run/netns")


def unavailable() -> str | None:
    """Why a cluster cannot start here (None: it can)."""
    if os.geteuid() != 0:
        return "the SLURM cluster tests need root (namespaces, daemons); `make test` runs them as root in CI"
    missing = [t for t in DAEMONS + TOOLS if shutil.which(t) is None]
    if missing:
        return (f"{', '.join(missing)} not installed: `make test` installs the Debian packages slurmctld slurmd "
                "slurm-client munge (as root with apt-get)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped is not)."""
    return _stat(pid) not in ("", "Z", "X")


def processes_of(conf: Path) -> list[int]:
    """Live processes started under this cluster: their environment names its ``SLURM_CONF`` (the
    daemons, slurmstepd, every job and step)."""
    found, needle = [], f"SLURM_CONF={conf}\0".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes() + b"\0":
                if alive(int(proc.name)):
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


class Cluster:
    """``Cluster(dir, subnet=213).start()``: nodes n1, n2 at 10.<subnet>.0.11 and .12, the controller at
    10.<subnet>.0.1; ``env()`` is the environment client commands need; ``stop()`` ends everything
    it started, by PID, and removes its namespaces and links."""

    def __init__(self, root: Path, subnet: int = 213, cpus_per_node: int = 2) -> None:
        self.root, self.cpus = Path(root), cpus_per_node
        tag = f"sd{os.getpid() % 100000}x{subnet}"
        self.bridge = f"{tag}br"[:15]
        self.netns = {n: f"{tag}-{n}" for n in ("n1", "n2")}
        self.prefix = f"10.{subnet}.0"
        self.controller_addr = f"{self.prefix}.1"
        self.addr = {"n1": f"{self.prefix}.11", "n2": f"{self.prefix}.12"}
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.links: list[str] = []
        self.created_netns: list[str] = []
        self.munge: Path | None = None

    # -- start ----------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "Cluster":
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._network()
            self._config()
            self._munge()
            self._daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            for node in ("n1", "n2"):
                self._node(node)
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _ip(self, *args: str, netns: str | None = None) -> None:
        cmd = ["ip", *(["-n", netns] if netns else []), *args]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")

    def _network(self) -> None:
        self._ip("link", "add", self.bridge, "type", "bridge")
        self.links.append(self.bridge)
        self._ip("addr", "add", f"{self.controller_addr}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for i, (node, ns) in enumerate(self.netns.items()):
            self._ip("netns", "add", ns)
            self.created_netns.append(ns)
            host_end = f"{self.bridge[:-2]}v{i}"[:15]
            self._ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.links.append(host_end)
            self._ip("link", "set", host_end, "master", self.bridge)
            self._ip("link", "set", host_end, "up")
            self._ip("addr", "add", f"{self.addr[node]}/24", "dev", "eth0", netns=ns)
            self._ip("link", "set", "eth0", "up", netns=ns)
            self._ip("link", "set", "lo", "up", netns=ns)
        hosts = [f"127.0.0.1 localhost", f"{self.controller_addr} {socket.gethostname()}"]
        hosts += [f"{a} {n}" for n, a in self.addr.items()]
        (self.root / "hosts").write_text("\n".join(hosts) + "\n")

    def _config(self) -> None:
        d = self.root
        for sub in ("state", "spool", "run", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # munged wants its socket's directory mode 755 and every directory above it searchable by all,
        # which pytest's private temporary directories are not
        self.munge = Path(tempfile.mkdtemp(prefix="selfdistill-munge-"))
        self.munge.chmod(0o755)
        (d / "plugstack.conf").write_text("")
        self.ports = {"ctld": free_port(), "n1": free_port(), "n2": free_port()}
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={n} NodeAddr={a} Port={self.ports[n]} CPUs={self.cpus} Sockets=1 "
            f"CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN" for n, a in self.addr.items())
        self.conf.write_text(f"""\
ClusterName=selfdistilltest
SlurmctldHost={socket.gethostname()}({self.controller_addr})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={self.ports['ctld']}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge}/munge.socket,cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
PlugStackConfig={d}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
MpiDefault=none
ReturnToService=2
KillWait=10
MailProg=/bin/true
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env(), start_new_session=True)
        log.close()

    def _munge(self) -> None:
        m = self.munge
        subprocess.run(["mungekey", "-c", "-k", str(m / "munge.key")], check=True, capture_output=True)
        self._daemon("munged", ["munged", "-F", "-S", str(m / "munge.socket"), f"--key-file={m / 'munge.key'}",
                                f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                                f"--seed-file={m / 'munged.seed'}"])
        deadline = time.monotonic() + 10
        while not (m / "munge.socket").exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {self.logs()}")
            time.sleep(0.02)

    def _node(self, node: str) -> None:
        """slurmd in the node's network namespace (nsenter: `ip netns exec` remounts /sys, which breaks
        slurmd) and in new UTS and mount namespaces: the node's hostname and hosts file."""
        self._daemon(f"slurmd-{node}", self.on_node(node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)]))

    def on_node(self, node: str, cmd: list[str]) -> list[str]:
        """``cmd`` as it runs on ``node``: in its network namespace, with its hostname and hosts file
        (each argument passed as it is, no shell re-parsing)."""
        inner = f'mount --bind {self.root / "hosts"} /etc/hosts && hostname {node} && exec "$@"'
        return ["nsenter", f"--net={NETNS / self.netns[node]}", "unshare", "--mount", "--uts", "--propagation",
                "private", "sh", "-c", inner, "sh", *cmd]

    def _wait_ready(self, timeout: float) -> None:
        """Ready when a two-node step runs (sinfo can say idle before slurmd registered)."""
        deadline = time.monotonic() + timeout
        while True:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}: {self.logs()}")
            r = subprocess.run(["srun", "-N2", "-n2", "--immediate=5", "hostname"], env=self.env(),
                               capture_output=True, text=True, timeout=30)
            if r.returncode == 0 and sorted(r.stdout.split()) == ["n1", "n2"]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not become ready: {r.stderr.strip()[-500:]}; {self.logs()}")
            time.sleep(0.3)

    # -- use ------------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, SLURM_CONF=str(self.conf), **extra)
        for k in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            env.pop(k)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=self.env(**env), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def sbatch(self, *args: str, cwd: Path | None = None, **env: str) -> int:
        r = subprocess.run(["sbatch", "--parsable", *args], env=self.env(**env), capture_output=True, text=True,
                           timeout=60, cwd=cwd)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)}: {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, BatchHost, ...); {} when unknown."""
        r = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if r.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", r.stdout))

    def wait_job(self, job_id: int, states: tuple[str, ...], timeout: float = 300,
                 start_now: bool = True) -> dict[str, str]:
        """Poll until the job reaches one of ``states``. ``start_now``: a requeued job waits for its
        BeginTime (~2 min); tell SLURM to start it now, as an impatient admin would, but not within
        2 s of the requeue: slurmd refuses a job started in the second its old credential was
        revoked ("Job credential revoked", the job FAILED)."""
        deadline, seen, held_since = time.monotonic() + timeout, set(), None
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "")
            seen.add(state)
            if state in states:
                return info
            if start_now and state == "PENDING" and info.get("Reason") == "BeginTime":
                held_since = held_since or time.monotonic()
                if time.monotonic() - held_since > 2:
                    self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not {'/'.join(states)} after {timeout} s (seen {seen}): {info}")
            time.sleep(0.2)

    def logs(self) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-1500:]}")
        return "\n".join(out)

    # -- stop -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, wait until none is left, then TERM (later KILL) the daemons by PID; remove
        the namespaces and links this cluster made."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user=root", check=False, timeout=20)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                r = self.run("squeue", "-h", "-o", "%i", check=False, timeout=20)
                if r.returncode == 0 and not r.stdout.strip():
                    break
                time.sleep(0.2)
        for name in [n for n in ("slurmd-n1", "slurmd-n2", "slurmctld", "munged") if n in self.procs]:
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        # anything a job left (a slurmstepd, a rank) mentions the cluster's directory
        deadline = time.monotonic() + 20
        while (left := processes_of(self.conf)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in processes_of(self.conf):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for ns in self.created_netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if self.bridge in self.links:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        self.created_netns, self.links = [], []
        if self.munge is not None:
            shutil.rmtree(self.munge, ignore_errors=True)

    def leftovers(self) -> list[str]:
        """What is still there after ``stop``: processes, namespaces, links (expected: nothing)."""
        left = [f"pid {p}" for p in processes_of(self.conf)]
        left += [f"{n} pid {p.pid}" for n, p in self.procs.items() if alive(p.pid)]
        left += [f"netns {ns}" for ns in self.netns.values() if (NETNS / ns).exists()]
        r = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True)
        left += [f"link {self.bridge}" for line in r.stdout.splitlines() if f" {self.bridge}:" in line]
        left += [f"directory {self.munge}"] if self.munge is not None and self.munge.exists() else []
        return left
