"""The MLflow UI really compares a sweep's trials.

A store is built the way a sweep writes it (plora_ray.tracking.driver: a parent run and three nested
trial runs with loss curves, unloads and eval metrics), a real ``mlflow server`` is started on it
(loopback only), its REST API is asked for the runs and curves, and headless Chromium renders the
compare-runs view and the loss-curve view of the three trials. Screenshots are saved under the
test's tmp dir and copied to ``$PLORA_TEST_ARTIFACTS`` when that is set.

Chromium: Debian packages ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``;
``PLORA_CHROMIUM`` overrides). Without it the rendering test is skipped; the REST test still runs.
"""

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from html import unescape
from pathlib import Path
from urllib.parse import quote

import pytest

from plora_ray.tracking import driver, naming, worker

requests = pytest.importorskip("requests")

STEPS = 40
UNLOAD_EVERY = 10
EVAL_STEPS = (20, 40)
LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")
# (trial id, name, momentum, last step, status): trial 2 is stopped early by the scheduler
TRIALS = [("t_00000", "m0 s0", 0.0, STEPS, "finished"),
          ("t_00001", "m0.3 s0", 0.3, STEPS, "finished"),
          ("t_00002", "m0.6 s0", 0.6, 20, "stopped_early")]
SERVER_START_TIMEOUT_S = 120
CHROMIUM_TIMEOUT_S = 120


def loss(i, step):
    return 3.0 * math.exp(-step / (10 + 5 * i)) + 0.1 * i


def eval_metrics(i, step):
    return {"eval/gsm8k/strict": 0.05 * i + step / 400, "eval/gsm8k/flexible": 0.06 * i + step / 400,
            "eval/mmlu/acc": 0.3 + 0.01 * i, "eval/mmlu/social_sciences": 0.31 + 0.01 * i,
            "eval/arc_easy/acc": 0.4 + 0.02 * i, "eval/arc_challenge/acc_norm": 0.25 + 0.01 * i}


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    """An MLflow store as a 3-trial sweep writes it; returns what the tests check against."""
    directory = tmp_path_factory.mktemp("sweep")
    uri = driver.default_tracking_uri(directory)
    exp = driver.ensure_experiment(uri, "plora-ui-test")
    space = directory / "unload.yaml"
    space.write_text("sweep: {name: unload, metric: train/loss, mode: min}\n"
                     "space:\n  plora.momentum: {grid: [0.0, 0.3, 0.6]}\n")
    parent = driver.start_sweep_run(uri, exp, "unload", space, {"plora.scheduler": "asha"})
    runs = {}
    for i, (trial_id, name, momentum, last, status) in enumerate(TRIALS):
        assert naming.run_name({"plora.momentum": momentum}, 0) == name
        run_id = driver.trial_run(uri, exp, parent, trial_id, name,
                                    {"plora": {"momentum": momentum, "unload_every_steps": 10},
                                     "lora": {"rank": 8}, "optim": {"lr": 1e-4}},
                                    naming.trial_tags({"plora.momentum": momentum}, 0),
                                    {"plora": {"momentum": momentum}})
        with worker.RunLogger(uri, run_id) as logger:
            for step in range(1, last + 1):
                logger.log_metrics({"train/loss": loss(i, step), "train/lr": 1e-4,
                                    "train/samples": 24 * step, "train/tokens_per_s": 300.0 + i},
                                   step)
                if step % UNLOAD_EVERY == 0:
                    stage = step // UNLOAD_EVERY
                    logger.log_unload(stage, step, 24 * step, {layer: 8 * stage for layer in LAYERS},
                                      seconds=0.02, output_change=0.0)
                if step in EVAL_STEPS:
                    logger.log_metrics(eval_metrics(i, step), step)
        driver.set_trial_status(uri, run_id, status)
        runs[trial_id] = run_id
    driver.finish_sweep(uri, parent, {"plora.best_trial_id": "t_00000"})
    return {"uri": uri, "dir": directory, "db": directory / driver.DEFAULT_DB,
            "experiment_id": exp, "parent": parent, "runs": runs}


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mlflow_cli():
    script = Path(sys.executable).with_name("mlflow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlflow"]


def _stop(proc):
    """Stop the server and the processes it started (its own session / process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def mlflow_server(sweep_store, tmp_path_factory):
    """``mlflow server`` on 127.0.0.1:<free port> over the sweep's store; its base URL."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "mlflow-server.log"
    cmd = [*_mlflow_cli(), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{sweep_store['db'].resolve().as_posix()}",
           "--default-artifact-root", str(sweep_store["dir"] / "mlartifacts"), "--workers", "1"]
    assert cmd[cmd.index("--backend-store-uri") + 1].startswith("sqlite:////")
    # The job runner (huey consumers, for GenAI scoring jobs) is not needed to browse runs.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n"
                            f"{log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not up after {SERVER_START_TIMEOUT_S} s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield base
    finally:
        _stop(proc)


def _search(base, experiment_id, filter_string=""):
    runs, token = [], None
    while True:
        body = {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 100}
        if token:
            body["page_token"] = token
        response = requests.post(f"{base}/api/2.0/mlflow/runs/search", json=body, timeout=30)
        assert response.status_code == 200, response.text
        payload = response.json()
        runs.extend(payload.get("runs", []))
        token = payload.get("next_page_token")
        if not token:
            return runs


def _history(base, run_id, key):
    response = requests.get(f"{base}/api/2.0/mlflow/metrics/get-history",
                            params={"run_id": run_id, "metric_key": key}, timeout=30)
    assert response.status_code == 200, response.text
    return sorted(response.json().get("metrics", []), key=lambda m: (int(m["step"]), m["timestamp"]))


def test_rest_api_serves_the_sweep(sweep_store, mlflow_server):
    base, exp, parent, runs = (mlflow_server, sweep_store["experiment_id"], sweep_store["parent"],
                               sweep_store["runs"])
    everything = _search(base, exp)
    assert len(everything) == 1 + len(TRIALS)
    children = _search(base, exp, f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r["info"]["run_id"] for r in children) == sorted(runs.values())

    by_trial = {}
    for run in children:
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        by_trial[tags["plora.trial_id"]] = (run, tags)
    for i, (trial_id, name, momentum, last, status) in enumerate(TRIALS):
        run, tags = by_trial[trial_id]
        assert run["info"]["run_id"] == runs[trial_id]
        assert run["info"]["run_name"] == name
        assert run["info"]["status"] == driver.TRIAL_STATUSES[status]
        assert tags["plora.status"] == status and tags["plora.sweep"] == "unload"
        assert tags["space.plora.momentum"] == str(momentum) and tags["plora.seed"] == "0"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params == {"plora.momentum": str(momentum), "plora.unload_every_steps": "10",
                          "lora.rank": "8", "optim.lr": "0.0001"}
        latest = {m["key"]: m for m in run["data"]["metrics"]}
        assert latest["train/loss"]["step"] in (last, str(last))
        assert latest["train/loss"]["value"] == pytest.approx(loss(i, last))

        curve = _history(base, run["info"]["run_id"], "train/loss")
        assert [int(m["step"]) for m in curve] == list(range(1, last + 1))
        assert [m["value"] for m in curve] == pytest.approx([loss(i, s) for s in range(1, last + 1)])
        stages = _history(base, run["info"]["run_id"], "plora/stage")
        assert [(int(m["step"]), m["value"]) for m in stages] == [
            (s, s // UNLOAD_EVERY) for s in range(UNLOAD_EVERY, last + 1, UNLOAD_EVERY)]
        assert not [k for k in latest if k.startswith("plora/accumulated_rank/")]  # tables, not charts
        ranks = requests.get(f"{base}/api/2.0/mlflow/artifacts/list",
                             params={"run_id": run["info"]["run_id"], "path": "ranks"}, timeout=30)
        assert [f["path"] for f in ranks.json()["files"]] == [
            f"ranks/unload_{s:04d}.json" for s in range(1, last // UNLOAD_EVERY + 1)]
        evals = _history(base, run["info"]["run_id"], "eval/mmlu/social_sciences")
        assert [int(m["step"]) for m in evals] == [s for s in EVAL_STEPS if s <= last]
        assert evals[-1]["value"] == pytest.approx(0.31 + 0.01 * i)

    sweep = next(r for r in everything if r["info"]["run_id"] == parent)
    sweep_tags = {t["key"]: t["value"] for t in sweep["data"]["tags"]}
    assert sweep["info"]["status"] == "FINISHED"
    assert sweep_tags["plora.best_trial_id"] == "t_00000"
    assert sweep_tags["mlflow.source.git.commit"]
    artifacts = requests.get(f"{base}/api/2.0/mlflow/artifacts/list",
                             params={"run_id": parent, "path": "search_space"}, timeout=30)
    assert artifacts.status_code == 200, artifacts.text
    assert [f["path"] for f in artifacts.json()["files"]] == ["search_space/unload.yaml"]


# --------------------------------------------------------------------------- rendering


def _chromium():
    candidates = [os.environ.get("PLORA_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                  shutil.which("chromium-browser")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _json_param(value):
    return quote(json.dumps(value, separators=(",", ":")), safe="")


def _render(url, png, profile, window="1600,1000", budget_ms=15000):
    """Headless Chromium: screenshot ``url`` to ``png``; returns the rendered DOM as text."""
    chromium = _chromium()
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-quic", f"--user-data-dir={profile}", f"--screenshot={png}",
           f"--window-size={window}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    text = re.sub(r"<(style|script)\b.*?</\1>", " ", done.stdout, flags=re.S)
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", text)))


def _render_until(url, png, tmp_path, expected, window):
    """Render; if the single-page app had not finished (an expected text missing), once more
    with a longer virtual-time budget."""
    for attempt, budget in enumerate((15000, 40000)):
        text = _render(url, png, tmp_path / f"chromium-profile-{png.stem}-{attempt}", window, budget)
        missing = [word for word in expected if word not in text]
        if not missing:
            return text
    pytest.fail(f"{url} rendered without {missing}; page text: {text[:2000]}")


def _check_png(png, width, height):
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000, f"{png} is only {len(data)} bytes"
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(png) as image:
        assert image.size == (width, height)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 50, f"{png} has only {len(colors)} colors"


def _keep(png):
    target = os.environ.get("PLORA_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, Path(target) / png.name)


def test_ui_compares_the_trials(sweep_store, mlflow_server, tmp_path):
    if _chromium() is None:
        pytest.skip("headless Chromium not found (/usr/bin/chromium): "
                    "apt-get install -y chromium chromium-driver; the REST test still ran")
    exp, runs = sweep_store["experiment_id"], sweep_store["runs"]
    run_ids = [runs[trial_id] for trial_id, *_ in TRIALS]
    names = [name for _, name, *_ in TRIALS]

    # MLflow 3 compare view (hash router): /#/compare-runs?runs=[...]&experiments=[...]
    runs = quote(json.dumps(list(run_ids), separators=(",", ":")), safe="")
    experiments = quote(json.dumps([str(exp)], separators=(",", ":")), safe="")
    compare_url = f"{mlflow_server.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"
    compare_png = tmp_path / "mlflow-compare-runs.png"
    text = _render_until(compare_url, compare_png, tmp_path, window="1600,1600", expected=[
        f"Comparing {len(TRIALS)} Runs from 1 Experiment", *names, *run_ids,
        "plora.momentum", "train/loss", "eval/gsm8k/strict", "plora/accumulated_rank"])
    # the parameter row shows each trial's momentum, in run order
    assert re.search(r"plora\.momentum\s+0\.0\s+0\.3\s+0\.6", text), text[:3000]
    _check_png(compare_png, 1600, 1600)
    _keep(compare_png)

    # the loss curves of the three trials on one chart
    metric_url = (f"{mlflow_server}/#/metric?runs={_json_param(run_ids)}"
                  f"&metric={_json_param('train/loss')}&experiments={_json_param([exp])}"
                  f"&plot_metric_keys={_json_param(['train/loss'])}&x_axis=step"
                  f"&y_axis_scale=linear&line_smoothness=1&show_point=false")
    curves_png = tmp_path / "mlflow-train-loss.png"
    text = _render_until(metric_url, curves_png, tmp_path, window="1600,1000", expected=[
        *[f"{name} (train/loss)" for name in names], "Step",
        f"{loss(0, STEPS)} (step={STEPS})", f"{loss(2, 20)} (step=20)"])
    _check_png(curves_png, 1600, 1000)
    _keep(curves_png)
