"""A Ray cluster of several hosts on one Linux machine: network namespaces joined by a bridge.

    sudo .venv/bin/python scripts/netns_cluster.py up --hosts 3      # prints the head's addresses
    sudo .venv/bin/python scripts/netns_cluster.py down              # also after a crash

Each host is a network namespace with its own address on a private bridge (10.77.0.0/24, used for
nothing else: the bridge is 10.77.0.1, host i is 10.77.0.1i), its own /tmp (a mount namespace
with a tmpfs) and its own host name (a UTS namespace), so its Ray processes see no other host's
files: no shared disk, as on real machines. (They do see the machine's folders outside /tmp:
nothing of a run goes there unless asked. /run/netns-cluster/shared is the folder for a run
that wants a shared file system, as an NFS mount would be: Horovod's checkpoints.) The head and
the workers are started with the commands of the on-prem instructions and the SLURM script
(`ray start --head --node-ip-address <ip>`, `ray start --address <head>:6379 --node-ip-address
<ip>`); from the default namespace the head's Jobs API answers at http://10.77.0.11:8265.
Everything started is recorded (namespaces, bridge, process groups) in
/run/netns-cluster/state.json, and `down` removes all of it, by PID and by name.

Needs root and `ip netns` (iproute2). tests/test_multi_host.py uses `NamespaceCluster` directly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.77.0"
BRIDGE = "pl-br0"
PREFIX = "pl-host"
STATE = Path("/run/netns-cluster/state.json")
HOSTS_FILE = STATE.parent / "hosts"  # bind-mounted as every host's /etc/hosts
SHARED = STATE.parent / "shared"  # the one folder meant to be shared: it stands for an NFS mount
HEAD_PORT, DASHBOARD_PORT = 6379, 8265
DASHBOARD_STARTUP_TIMEOUT_S = "300"  # seconds, as the pipeline's own head (pipeline/runtime/local_head.py)


class ClusterError(RuntimeError):
    """The namespace cluster could not be built (one line, naming the step)."""


def available() -> str | None:
    """Why this machine cannot build the cluster, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and a bridge)"
    if shutil.which("ip") is None:
        return "needs `ip` from iproute2"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` does not work here ({probe.stderr.strip()[:120]})"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class Host:
    index: int

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.index}"

    @property
    def ip(self) -> str:
        return f"{SUBNET}.{10 + self.index}"


@dataclass
class NamespaceCluster:
    """`hosts` namespaces, Ray head on the first, one Ray worker node on each other."""

    hosts: int = 3
    cpus_per_host: int = 1
    head_cpus: int | None = None  # None: cpus_per_host; 0 keeps training off the head
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every Ray process
    log_dir: Path = Path("/tmp/netns-cluster")
    pgids: list[int] = field(default_factory=list)

    @property
    def members(self) -> list[Host]:
        return [Host(i) for i in range(1, self.hosts + 1)]

    @property
    def head(self) -> Host:
        return self.members[0]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{HEAD_PORT}"

    @property
    def jobs_address(self) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    # ------------------------------------------------------------------ network
    def _network_up(self) -> None:
        # Every host resolves every host's name: Horovod groups ranks into hosts by name, and gloo's
        # full mesh aborts when a peer's name does not resolve.
        HOSTS_FILE.parent.mkdir(parents=True, exist_ok=True)
        HOSTS_FILE.write_text("127.0.0.1 localhost\n" + "".join(f"{h.ip} {h.name}\n" for h in self.members))
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for host in self.members:
            outside, inside = f"pl-v{host.index}", f"pl-v{host.index}n"
            _ip("netns", "add", host.name)
            # IPv4 only: no link-local IPv6 address that a wildcard socket would also answer on
            subprocess.run(["ip", "netns", "exec", host.name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                            "net.ipv6.conf.default.disable_ipv6=1"], check=True, capture_output=True)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", outside, "master", BRIDGE)
            _ip("link", "set", outside, "up")
            _ip("link", "set", inside, "netns", host.name)
            _ip("-n", host.name, "link", "set", inside, "name", "eth0")
            _ip("-n", host.name, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _ip("-n", host.name, "link", "set", "eth0", "up")
            _ip("-n", host.name, "link", "set", "lo", "up")
            _ip("-n", host.name, "route", "add", "default", "via", f"{SUBNET}.1")

    # ------------------------------------------------------------------ processes
    def spawn(self, host: Host, argv: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
        """Run `argv` on `host`: in its network namespace, in a mount namespace with a /tmp of
        its own and a UTS namespace with its own host name, in a new process group recorded for
        `down`."""
        log.parent.mkdir(parents=True, exist_ok=True)
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", **self.env}
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            env.pop(key, None)
        # Its own host name too (a UTS namespace), which every host resolves (HOSTS_FILE as its
        # /etc/hosts, as DNS does on real machines).
        names = f"hostname {host.name} && mount --bind {HOSTS_FILE} /etc/hosts"
        script = f'{names} && mount -t tmpfs -o size=4g tmpfs /tmp && exec "$@"'
        prefix = Path(sys.prefix).resolve()
        if prefix.is_relative_to("/tmp"):  # a checkout under /tmp: keep its environment in sight
            keep = STATE.parent / "tmp"
            keep.mkdir(parents=True, exist_ok=True)
            script = (f'{names} && mount --bind /tmp {keep} && mount -t tmpfs -o size=4g tmpfs /tmp && '
                      f'mkdir -p {prefix} && mount --bind {keep / prefix.relative_to("/tmp")} {prefix} && exec "$@"')
        proc = subprocess.Popen(["ip", "netns", "exec", host.name, "unshare", "--mount", "--uts", "--propagation",
                                 "private", "sh", "-c", script, "host", *argv],
                                cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.pgids.append(proc.pid)
        self._save()
        return proc

    def _ray_up(self) -> None:
        ray = str(Path(sys.executable).parent / "ray")
        # One token for every node and every client (Ray 2.59+), as on a real cluster: a joining
        # node that sends none is refused. ~/.ray/auth_token stands for the secret each host gets.
        self.env.setdefault("RAY_AUTH_MODE", "token")
        # Ray gives its dashboard 60 s to start, and `ray start --head` fails after that; a busy
        # machine (CI beside other work) has taken longer. The pipeline's own head waits 300 s.
        if "RAY_DASHBOARD_STARTUP_TIMEOUT_S" not in os.environ:
            self.env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", DASHBOARD_STARTUP_TIMEOUT_S)
        if not (Path.home() / ".ray" / "auth_token").is_file() and "RAY_AUTH_TOKEN" not in os.environ:
            subprocess.run([ray, "get-auth-token", "--generate"], check=True, capture_output=True)
        head_cpus = ["--num-cpus", str(self.cpus_per_host if self.head_cpus is None else self.head_cpus)]
        head = self.head
        self.spawn(head, [ray, "start", "--head", "--node-ip-address", head.ip, "--port", str(HEAD_PORT),
                          "--dashboard-host", head.ip, "--dashboard-port", str(DASHBOARD_PORT),
                          "--include-dashboard", "true", *head_cpus, "--block", "--disable-usage-stats"],
                   self.log_dir / f"{head.name}.log")
        self._wait(lambda: self._answers(f"{self.jobs_address}/api/version"), int(DASHBOARD_STARTUP_TIMEOUT_S) + 60,
                   "the head's dashboard")
        for host in self.members[1:]:
            self._join(host)
        self._wait(lambda: len(self.alive_nodes()) >= self.hosts, 180, f"{self.hosts} alive nodes")

    def _join(self, host: Host) -> None:
        """`ray start --address <head>` on a worker host (the on-prem instructions' command)."""
        ray = str(Path(sys.executable).parent / "ray")
        self.spawn(host, [ray, "start", "--address", self.gcs_address, "--node-ip-address", host.ip,
                          "--num-cpus", str(self.cpus_per_host), "--block", "--disable-usage-stats"],
                   self.log_dir / f"{host.name}.log")

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except urllib.error.HTTPError as e:
            return e.code == 401  # up, asking for its token (Ray 2.59+)
        except OSError:
            return False

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.time() + timeout_s
        while not ready():
            if time.time() > deadline:
                tails = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.log_dir.glob("*.log")))
                raise ClusterError(f"namespace cluster: no {what} after {timeout_s:.0f} s\n{tails}")
            time.sleep(1)

    def alive_nodes(self) -> list[str]:
        """The node IPs of the alive Ray nodes, from the head's State API (asked from the default
        namespace over the bridge, with the cluster token)."""
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from pipeline.runtime.jobs import auth_token

        token = auth_token()
        request = urllib.request.Request(f"{self.jobs_address}/api/v0/nodes?limit=100",
                                         headers={"authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                nodes = json.loads(response.read())["data"]["result"]["result"]
        except (OSError, KeyError, ValueError):
            return []
        return sorted(n["node_ip"] for n in nodes if n.get("state") == "ALIVE")

    def host_pids(self, host: Host) -> list[int]:
        """Every process in `host`'s network namespace."""
        out = _ip("netns", "pids", host.name, check=False).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    def kill_host(self, host: Host) -> None:
        """Every process of `host`, at once, by PID (a machine that died); its /tmp goes with them."""
        for pid in self.host_pids(host):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def restart_host(self, host: Host, timeout_s: float = 180) -> None:
        """A killed worker host back, as after a reboot (an empty /tmp): Ray started on it again,
        waited for until the head counts it alive."""
        deadline = time.time() + 60
        while self.host_pids(host) and time.time() < deadline:  # the old processes gone first
            time.sleep(0.2)
        self._join(host)
        self._wait(lambda: host.ip in self.alive_nodes(), timeout_s, f"{host.name} back")

    # ------------------------------------------------------------------ lifecycle
    def _save(self) -> None:
        STATE.parent.mkdir(parents=True, exist_ok=True)
        STATE.write_text(json.dumps({"hosts": self.hosts, "pgids": self.pgids}))

    def up(self) -> NamespaceCluster:
        if reason := available():
            raise ClusterError(f"namespace cluster: {reason}")
        down()  # what a crashed run left behind
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob("*.log"):  # an earlier cluster's, which an error's log tails would show
            old.unlink()
        SHARED.mkdir(parents=True, exist_ok=True)
        self._save()
        try:
            self._network_up()
            self._ray_up()
        except BaseException:
            down()
            raise
        return self

    def __enter__(self) -> NamespaceCluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        down()


def down() -> list[str]:
    """Remove everything a namespace cluster started: its process groups (recorded), every
    process left in its namespaces, the namespaces, the veths and the bridge. Idempotent.
    Returns what it removed."""
    removed: list[str] = []
    recorded = json.loads(STATE.read_text()) if STATE.is_file() else {}
    for pgid in recorded.get("pgids", []):
        try:
            os.killpg(pgid, signal.SIGKILL)
            removed.append(f"process group {pgid}")
        except (ProcessLookupError, PermissionError):
            pass
    names = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines()
             if line.startswith(PREFIX)]
    for name in names:
        for pid in _ip("netns", "pids", name, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline and any(_ip("netns", "pids", n, check=False).stdout.split() for n in names):
        time.sleep(0.2)
    for name in names:
        _ip("netns", "del", name, check=False)
        removed.append(f"namespace {name}")
    # a namespace's veth goes with it, but not always at once: the next `up` must find none
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0]
        if link.startswith("pl-v"):
            _ip("link", "del", link, check=False)
            removed.append(f"link {link}")
    if _ip("link", "show", BRIDGE, check=False).returncode == 0:
        _ip("link", "del", BRIDGE, check=False)
        removed.append(f"bridge {BRIDGE}")
    STATE.unlink(missing_ok=True)
    HOSTS_FILE.unlink(missing_ok=True)
    if SHARED.is_dir():
        shutil.rmtree(SHARED, ignore_errors=True)
        removed.append(f"folder {SHARED}")
    return removed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up_cmd = sub.add_parser("up", help="build the hosts and start Ray on them (stays up until `down`)")
    up_cmd.add_argument("--hosts", type=int, default=3)
    up_cmd.add_argument("--cpus-per-host", type=int, default=1)
    sub.add_parser("down", help="remove every namespace, process and the bridge")
    args = parser.parse_args()
    if args.command == "down":
        print("\n".join(down()) or "nothing to remove")
        return
    cluster = NamespaceCluster(args.hosts, args.cpus_per_host).up()
    print(f"{args.hosts} hosts up: head {cluster.head.ip}; Jobs API {cluster.jobs_address}; GCS {cluster.gcs_address}")
    print("    pipeline submit --address", cluster.jobs_address, "-- dvc repro")
    print("take it down with: scripts/netns_cluster.py down")


if __name__ == "__main__":
    try:
        main()
    except ClusterError as e:
        sys.exit(f"error: {e}")
