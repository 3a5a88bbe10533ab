"""A real multi-node Ray cluster and an MLflow server on this machine, for the cluster tests.

Two ``ray start --block`` processes (a head and a second node, ``--num-cpus 1`` each, every
port picked free, temp dirs of their own under /tmp: Ray's AF_UNIX socket paths are too long
under pytest's tmp) and one ``mlflow server``, all on loopback.
Every process is started in its own session, so stopping it means killing exactly the
processes of that session (the raylet, GCS, dashboard, workers and job drivers that node
started), never ``ray stop``, which would kill every Ray cluster on the host.

Ray replaces ``127.0.0.1`` and ``localhost`` (as a node address and as the address a node
joins) by the host's routable address (``services.resolve_ip_for_localhost``), so the nodes
use other loopback addresses, which Ray leaves as given: the head ``127.0.0.2``, the second
node ``127.0.0.3``. The dashboard and MLflow listen on ``127.0.0.1``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def worker_port_range(i: int) -> int:
    """The first of 200 worker ports for node i: below the kernel's ephemeral range, where
    free_port() draws the other components' ports, so the two never collide (they did in CI)."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    low = 20000  # above Ray's own defaults (8265, 10001, local workers 10002-19999)
    top = max(ephemeral - 200, low + 1000)
    return low + (os.getpid() * 7 + i * 200) % (top - low)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Every live process whose session id is ``sid``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_sid(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (never this process's own)."""
    assert sid != os.getsid(0)
    for _ in range(3):  # a process may fork while the first pass runs
        for pid in session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process of its session (it was started with
    ``start_new_session=True``); nothing else on the host is touched."""
    kill_sid(proc.pid)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def base_env(tmp: Path) -> dict[str, str]:
    # the cluster the tests start is local: no token authentication, Train's fast polling;
    # `python` of a job's entrypoint is this interpreter; tests/ for cluster_hooks
    return dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}",
                PATH=f"{BIN}:{os.environ.get('PATH', '')}",
                DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                RAY_TRAIN_ENABLE_PRINT_PATCH="0")


class Node:
    def __init__(self, proc: subprocess.Popen, ip: str, temp_dir: Path, log: Path):
        self.proc, self.ip, self.temp_dir, self.log = proc, ip, temp_dir, log

    def raylet_pid(self) -> int | None:
        for pid in session_pids(self.proc.pid):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
            except OSError:
                continue
        return None

    def stop(self) -> None:
        kill_session(self.proc)


class LocalCluster:
    """A head and ``workers`` more nodes, each with 1 CPU, plus an MLflow server."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        # Ray's temp dirs hold AF_UNIX sockets (107 bytes at most): pytest's tmp paths are too
        # long for them, so a short directory of our own, removed in stop()
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="plr-"))
        self.env = base_env(tmp)
        self.nodes: list[Node] = []
        self.mlflow: subprocess.Popen | None = None
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.2:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.tracking_uri = ""
        self.nodes_up: list[dict] = []

    def _node_args(self, i: int, ip: str) -> list[str]:
        lo = worker_port_range(i)
        return ["--node-ip-address", ip, "--num-cpus", "1", "--object-store-memory", str(150 << 20),
                "--node-manager-port", str(free_port(ip)), "--object-manager-port", str(free_port(ip)),
                "--dashboard-agent-listen-port", str(free_port(ip)),
                "--dashboard-agent-grpc-port", str(free_port(ip)), "--metrics-export-port", str(free_port(ip)),
                "--runtime-env-agent-port", str(free_port(ip)), "--min-worker-port", str(lo),
                "--max-worker-port", str(lo + 199), "--temp-dir", str(self.ray_tmp / f"r{i}"),
                "--block", "--disable-usage-stats"]

    def _start(self, i: int, args: list[str], env: dict) -> Node:
        env = {**env, **self.node_env(i)}
        log = self.tmp / f"node{i}.log"
        ip = args[args.index("--node-ip-address") + 1]
        proc = subprocess.Popen([str(BIN / "ray"), "start", *args], env=env, start_new_session=True,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT)
        node = Node(proc, ip, self.ray_tmp / f"r{i}", log)
        self.nodes.append(node)
        return node

    def node_env(self, i: int) -> dict[str, str]:
        """What the processes of node ``i`` inherit: a ``sitecustomize`` that puts
        ``cluster_hooks.on_step`` after every step of its workers (tests/faults.py)."""
        return {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}:{ROOT / 'tests' / 'faults_site'}",
                "PLORA_TEST_STEP_FAULT": "cluster_hooks:on_step", "PLORA_TEST_NODE": f"node{i}",
                "PLORA_TEST_DIR": str(self.tmp)}

    def start_head(self) -> Node:
        return self._start(0, ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                               "--dashboard-port", str(self.dashboard_port),
                               "--ray-client-server-port", str(free_port()), *self._node_args(0, "127.0.0.2")],
                           self.env)

    def add_node(self) -> Node:
        i = len(self.nodes)
        return self._start(i, ["--address", self.address, *self._node_args(i, f"127.0.0.{i + 2}")], self.env)

    def alive_nodes(self) -> list[dict]:
        """ray.nodes() of this cluster, asked in a child process (the test process stays
        unconnected)."""
        import json

        answer = self._ask("print(json.dumps([{'id': n['NodeID'], 'ip': n['NodeManagerAddress']} "
                           "for n in ray.nodes() if n['Alive']]))")
        return json.loads(answer) if answer else []

    def _ask(self, code: str, timeout: float = 60) -> str:
        """What ``code`` prints in a child process connected to this cluster (the test process
        stays unconnected); "" if it fails."""
        prelude = "import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); " % self.address
        out = subprocess.run([sys.executable, "-c", prelude + code], env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""

    def free_cpus(self) -> float:
        """CPUs of the cluster that no task, actor or placement group holds."""
        answer = self._ask("print(ray.available_resources().get('CPU', 0.0))")
        return float(answer) if answer else -1.0

    def wait_idle(self, timeout: float = 120, release_after: float = 15) -> None:
        """Until every CPU of the cluster is free again: an earlier test's trials (a stopped
        job's, a killed driver's) are torn down asynchronously. A placement group a killed
        driver leaked (Ray has left one CREATED with its job dead) is still reserved after
        ``release_after`` seconds (a trial's teardown takes 1-2 s; CI once waited out the 60 s
        this was, after the batch test's stopped job): it is then released as the next sweep's
        driver would release it when it starts (plora_ray.ray.placement.release_leaked), which
        must free it (only groups whose job and creator both died are released)."""
        start = time.time()
        released = False
        while time.time() < start + timeout:
            if self.free_cpus() >= len(self.nodes_up):
                return
            if not released and time.time() > start + release_after:
                print(f"cluster not idle after {release_after} s:\n{self.diagnose()}", file=sys.stderr)
                print("released:", self._ask("from plora_ray.ray.placement import release_leaked; "
                                             "print(json.dumps(release_leaked('test: before the next sweep')))"),
                      file=sys.stderr)
                released = True
            time.sleep(1)
        raise RuntimeError(f"cluster not idle in {timeout} s:\n{self.diagnose()}")

    def diagnose(self) -> str:
        """The state to read when a cluster test times out: resources, live actors, the last
        steps the hook saw, the tail of each node's log."""
        actors = self._ask(
            "from ray.util.state import list_actors; print(json.dumps([(a.class_name, a.node_id[:8], a.pid) "
            "for a in list_actors(filters=[('state', '=', 'ALIVE')], limit=200)]))")
        resources = self._ask("print(json.dumps({'available': ray.available_resources(), "
                              "'total': ray.cluster_resources()}))")
        groups = self._ask("from plora_ray.ray.placement import placement_groups; "
                           "print(json.dumps([g for g in placement_groups() if g['state'] != 'REMOVED']))")
        jobs = self._ask("print(json.dumps([(j['JobID'], j['IsDead'], j.get('DriverPid')) for j in ray.state.jobs()]))")
        log = self.tmp / "steps.log"
        steps = log.read_text().splitlines()[-12:] if log.exists() else []
        parts = [f"resources: {resources}", f"alive actors: {actors}", f"placement groups: {groups}",
                 f"jobs: {jobs}", "last steps:", *steps]
        for i, node in enumerate(self.nodes):
            parts += [f"--- node{i}.log (tail)", *node.log.read_text(errors="replace").splitlines()[-15:]]
        return "\n".join(parts)

    def wait_started(self, node: Node, timeout: float = 180) -> None:
        """Until ``ray start`` says the node runs (it then blocks)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {node.log.read_text()[-3000:]}")
            if "Ray runtime started" in node.log.read_text():
                return
            time.sleep(0.5)
        raise RuntimeError(f"ray start not up in {timeout} s: {node.log.read_text()[-3000:]}")

    def wait_nodes(self, count: int, timeout: float = 120) -> list[dict]:
        for node in self.nodes:
            self.wait_started(node, timeout)
        deadline = time.time() + timeout
        while time.time() < deadline:
            nodes = self.alive_nodes()
            if len(nodes) >= count:
                return nodes
            time.sleep(1)
        raise RuntimeError(f"{count} nodes not up in {timeout} s")

    def start_mlflow(self) -> str:
        port = free_port()
        store = self.tmp / "mlflow"
        store.mkdir(exist_ok=True)
        self.mlflow = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
             "--default-artifact-root", str(store / "artifacts")],
            # no job runner (huey consumers for GenAI scoring): slow to start, not needed here
            env=dict(self.env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), start_new_session=True,
            stdout=open(self.tmp / "mlflow.log", "w"),
            stderr=subprocess.STDOUT)
        self.tracking_uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.tracking_uri
            except OSError:
                if self.mlflow.poll() is not None:
                    raise RuntimeError((self.tmp / "mlflow.log").read_text()[-2000:])
                time.sleep(0.5)
        raise RuntimeError("mlflow server not up in 60 s")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        if self.mlflow is not None:
            kill_session(self.mlflow)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
