"""Sweeps on a real two-node Ray cluster on this machine (tests/multinode.py: ``ray start`` head +
second node, 1 CPU each, loopback, an ``mlflow server`` on 127.0.0.1), tiny model.

With one CPU per node and one 1-CPU worker per trial, two concurrent trials run one on each
node. ``cluster_hooks.on_step`` (run by every trial of the cluster) records which node ran
which step and, while ``<tmp>/hold`` names a node, stops a trial on that node after step 5
(the checkpoint of step 4 written), so kills happen at a known point.

The tests share one cluster and run in file order; the last one kills the second node.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from multinode import LocalCluster, kill_session, kill_sid
from analysis.store import sweep_trials
from test_tune import base

ROOT = Path(__file__).resolve().parents[1]
# how long a trial may take to reach a point (quiet 2-core machine: 40-70 s; CI machines have
# been 1.4x slower, and a timeout here only costs time when a test fails)
WAIT_S = 600
pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    c = LocalCluster(tmp)
    try:
        c.wait_started(c.start_head())
        c.add_node()  # a node started before the head is up gives up
        c.start_mlflow()
        c.nodes_up = c.wait_nodes(2)
        yield c
    finally:  # every process started here, by its session: never `ray stop`
        c.stop()


@pytest.fixture(autouse=True)
def no_hold(cluster):
    (cluster.tmp / "hold").unlink(missing_ok=True)
    cluster.wait_idle(WAIT_S // 2)  # the trials of the test before are gone: both nodes' CPUs are free
    yield
    (cluster.tmp / "hold").unlink(missing_ok=True)


def hold_on(cluster, node="node1"):
    for marker in cluster.tmp.glob("reached-*"):
        marker.unlink()
    (cluster.tmp / "hold").write_text(node)


def write_space(path: Path, name: str, lrs, **fields) -> Path:
    data = {"name": name, "metric": "train/loss", "mode": "min", "searcher": {"type": "grid"}, "num_samples": 1,
            "max_concurrent": 2, "resources": {"workers": 1, "cpus_per_worker": 1},
            "base": base(data={"max_steps": 6}), "space": {"optim.lr": {"grid": list(lrs)}}}
    data.update(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tune_cmd(cluster, space, storage, *extra):
    return [sys.executable, "-m", "plora_ray.tune", str(space), "--storage", str(storage),
            "--tracking-uri", cluster.tracking_uri, "--no-report", *extra]


def parent_of(storage: Path, name: str) -> str:
    return json.loads((storage / f"{name}.latest.json").read_text())["parent_run_id"]


def steps(uri, run_id, key="train/loss"):
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def curve(uri, run_id, key):
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


def wait_for(predicate, timeout, what, cluster=None, output: Path | None = None):
    """``predicate()`` once it is true; on a timeout, a failure with the cluster's state (and
    the tail of the driver's ``output``) to read."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    state = cluster.diagnose() if cluster is not None else ""
    tail = "\n".join(output.read_text(errors="replace").splitlines()[-40:]) if output and output.exists() else ""
    pytest.fail(f"{what}: not within {timeout} s\n{state}\n--- driver (tail)\n{tail}")


def latest_step(storage: Path, run: str) -> int | None:
    """The step of the latest checkpoint Tune registered for the trial ``<sweep>-<trial id>``
    (the rows of its ``result.json``, written when the driver takes a report)."""
    sweep, trial_id = run.rsplit("-", 1)
    try:
        rows = [json.loads(line) for line in (storage / sweep / trial_id / "result.json").read_text().splitlines() if line]
    except (OSError, ValueError):
        return None
    return next((r.get("step") for r in reversed(rows) if r.get("checkpoint_dir_name")), None)


def node_steps(cluster) -> list[tuple[str, str, int]]:
    log = cluster.tmp / "steps.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [(run, node, int(step)) for run, node, step in (line.split() for line in lines)]


def test_sqlite_tracking_is_refused_on_a_multi_node_cluster(cluster, tmp_path):
    space = write_space(tmp_path / "space.yaml", "refused", [1e-3])
    done = subprocess.run([sys.executable, "-m", "plora_ray.tune", str(space), "--storage", str(tmp_path / "s"),
                           "--address", cluster.address], env=cluster.env, capture_output=True, text=True,
                          timeout=120)
    err = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(err) == 1, done.stderr[-2000:]
    assert "sqlite:////" in err[0] and "2 nodes" in err[0] and "mlflow server" in err[0]
    assert not (tmp_path / "s" / "mlflow.db").exists()  # refused before the first MLflow write


def test_batch_submits_two_sweeps_status_lists_both_stop_stops_one(cluster, tmp_path, capsys):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from plora_ray.cli.batch import main

    work = tmp_path / "work"
    for name in ("alpha", "beta"):
        write_space(work / f"{name}.yaml", name, [1e-3])
    batch = work / "batch.yaml"
    batch.write_text(yaml.safe_dump({
        "name": "b2", "working_dir": str(work), "storage": str(tmp_path / "sweeps"),
        "tracking_uri": cluster.tracking_uri, "report": False,
        "sweeps": [{"space": "alpha.yaml"}, {"space": "beta.yaml", "set": {"base.data.max_steps": 6}}]}))
    cli = ["--address", cluster.dashboard, "--state-dir", str(tmp_path / "state")]
    hold_on(cluster)  # the trial that lands on the second node waits after step 5
    assert main(["submit", str(batch), *cli]) == 0
    recorded = json.loads((tmp_path / "state" / "b2.json").read_text())
    assert sorted(recorded) == ["alpha", "beta"] and all(len(ids) == 1 for ids in recorded.values())
    held = wait_for(lambda: list(cluster.tmp.glob("reached-*")), WAIT_S, "a trial held on the second node", cluster)
    held_sweep = held[0].name.removeprefix("reached-").split("-")[0]  # reached-<sweep>-<time>-<trial>
    other = {"alpha": "beta", "beta": "alpha"}[held_sweep]
    capsys.readouterr()
    assert main(["status", str(batch), *cli]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["sweep", "job", "id"]
    rows = {line.split()[0]: line.split() for line in table[2:]}
    assert set(rows) == {"alpha", "beta"} and rows[held_sweep][2] == "RUNNING"
    assert main(["stop", str(batch), held_sweep, *cli]) == 0
    client = JobSubmissionClient(cluster.dashboard)
    ids = {name: ids[0] for name, ids in recorded.items()}
    wait_for(lambda: client.get_job_status(ids[held_sweep]) == JobStatus.STOPPED, 120, "the stopped job")
    wait_for(lambda: client.get_job_status(ids[other]) in (JobStatus.SUCCEEDED, JobStatus.FAILED), WAIT_S,
             "the other job")
    assert client.get_job_status(ids[other]) == JobStatus.SUCCEEDED, client.get_job_logs(ids[other])[-3000:]
    capsys.readouterr()
    assert main(["status", str(batch), *cli]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert (rows[held_sweep][2], rows[other][2]) == ("STOPPED", "SUCCEEDED")
    [trial] = sweep_trials(cluster.tracking_uri, parent_of(tmp_path / "sweeps", other))
    assert trial["status"] == "finished"
    [stopped] = sweep_trials(cluster.tracking_uri, parent_of(tmp_path / "sweeps", held_sweep))
    assert (stopped["status"], stopped["mlflow_status"]) == ("failed", "FAILED")  # not left RUNNING
    assert main(["logs", str(batch), other, *cli]) == 0
    logs = capsys.readouterr().out
    assert logs.startswith(f"==> {other} {ids[other]} (SUCCEEDED) <==") and f"\nsweep {other}-" in logs


def test_sweep_submitted_as_ray_job_spans_both_nodes_and_resumes_after_its_driver_is_killed(cluster, tmp_path):
    """A sweep submitted as a user types it (``ray job submit``) runs one trial on each node; its
    driver is killed (SIGKILL) with one trial finished and the other held mid-run; ``--resume``
    finishes the sweep without losing or duplicating a trial."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    space = write_space(tmp_path / "space.yaml", "drv", [1e-3, 2e-3])
    storage = tmp_path / "sweeps"
    hold_on(cluster)
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", cluster.dashboard,
              "--working-dir", str(ROOT), "--submission-id", "job-drv", "--no-wait", "--",
              *tune_cmd(cluster, space, storage)]
    submit[submit.index(sys.executable)] = "python"  # as a user types it
    done = subprocess.run(submit, env=cluster.env, capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    client = JobSubmissionClient(cluster.dashboard)

    def job_log() -> Path:  # the job's output, for a failure's message
        path = tmp_path / "job.log"
        path.write_text(client.get_job_logs("job-drv"))
        return path

    wait_for(lambda: list(cluster.tmp.glob("reached-drv-*")) and (storage / "drv.latest.json").exists() and any(
        t["status"] == "finished" for t in sweep_trials(cluster.tracking_uri, parent_of(storage, "drv"))),
        WAIT_S, "one trial finished and one held", cluster, job_log())
    # the job's driver (SIGKILL), with the session Ray's job supervisor started its entrypoint in:
    # its trials die with it
    kill_sid(os.getsid(int(client.get_job_info("job-drv").driver_info.pid)))
    wait_for(lambda: client.get_job_status("job-drv") in (JobStatus.FAILED, JobStatus.STOPPED), 120, "the killed job")
    (cluster.tmp / "hold").unlink()
    parent = parent_of(storage, "drv")
    before = sweep_trials(cluster.tracking_uri, parent)
    assert sum(t["status"] == "finished" for t in before) < 2  # really interrupted
    assert {t["tags"]["plora.nodes"] for t in before} == {n["id"] for n in cluster.nodes_up}  # one on each node
    cmd = tune_cmd(cluster, space, storage, "--address", cluster.address)
    done = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=cluster.env, capture_output=True, text=True,
                          timeout=WAIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    after = sweep_trials(cluster.tracking_uri, parent)
    assert len(after) == 2 and len({t["trial_id"] for t in after}) == 2
    assert all(t["status"] == "finished" for t in after), ([t["status"] for t in after], done.stderr[-3000:])
    assert {t["run_id"] for t in before} <= {t["run_id"] for t in after}  # continued, not duplicated
    for t in after:
        assert steps(cluster.tracking_uri, t["run_id"]) == [1, 2, 3, 4, 5, 6]


def test_lost_node_mid_trial_restarts_from_its_checkpoint_on_a_surviving_node(cluster, tmp_path):
    space = write_space(tmp_path / "space.yaml", "lost", [1e-3, 1e-3])  # twice the same trial: a reference
    storage = tmp_path / "sweeps"
    hold_on(cluster)
    driver = tmp_path / "driver.log"
    with open(driver, "w") as log:
        proc = subprocess.Popen(tune_cmd(cluster, space, storage, "--address", cluster.address), cwd=tmp_path,
                                env=cluster.env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        [marker] = wait_for(lambda: list(cluster.tmp.glob("reached-lost-*")), WAIT_S, "a trial held on node1",
                            cluster, driver)
        moved = marker.name.removeprefix("reached-")
        # the trial holds after step 5; the driver registers the checkpoint of step 4 when it
        # takes the report (asynchronously): kill only once it has, or the restart rightly
        # begins from the checkpoint of step 2
        wait_for(lambda: latest_step(storage, moved) == 4, WAIT_S, "the checkpoint of step 4 registered",
                 cluster, driver)
        raylet = cluster.nodes[1].raylet_pid()
        assert raylet is not None
        os.kill(raylet, signal.SIGKILL)  # the second node is lost in the middle of the trial's step 5
        # the hold stays: the node's orphaned worker must not go on before it notices it is gone
        proc.wait(timeout=WAIT_S)
    finally:
        kill_session(proc)
    assert proc.returncode == 0, driver.read_text()[-4000:]
    ids = {n["ip"]: n["id"] for n in cluster.nodes_up}
    head, lost = ids[cluster.nodes[0].ip], ids[cluster.nodes[1].ip]
    trials = sweep_trials(cluster.tracking_uri, parent_of(storage, "lost"))
    assert len(trials) == 2 and all(t["status"] == "finished" for t in trials)  # one MLflow run per trial
    [t] = [t for t in trials if moved.endswith(t["trial_id"])]
    assert t["tags"]["plora.nodes"] == f"{lost},{head}"  # moved to the surviving node
    assert steps(cluster.tracking_uri, t["run_id"]) == [1, 2, 3, 4, 5, 6]  # an unbroken step axis
    # the same curves as the identical trial that never moved: PLoRA's stages, ledger, optimizer
    # and data order came through the restart (the resume is exact)
    [ref] = [r for r in trials if r is not t]
    for key in ("train/loss", "plora/stage", "plora/accumulated_rank", "plora/accumulated_rank_min"):
        got, want = curve(cluster.tracking_uri, t["run_id"], key), curve(cluster.tracking_uri, ref["run_id"], key)
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), (key, got, want)
    assert curve(cluster.tracking_uri, t["run_id"], "plora/stage") == [(2, 1), (4, 2), (6, 3)]
    ran = [(node, step) for run, node, step in node_steps(cluster) if run == moved]
    assert ran[:5] == [("node1", s) for s in range(1, 6)]
    assert ran[5:] == [("node0", 5), ("node0", 6)]  # resumed after the checkpoint of step 4, not from step 1
