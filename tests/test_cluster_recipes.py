"""The cluster recipes of cluster/ and the shipped batch files, checked where a checker exists:
Ray's own cluster-config schema, the structure KubeRay's CRDs require, ``bash -n`` and the
commands of the Slurm script; the batch files through the batch CLI's validation. (Seconds.)"""

import copy
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from plora_ray.sweep.batch import load_batch
from plora_ray.cli.batch import main as batch_main

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def test_ray_up_config_passes_rays_cluster_schema_and_a_typo_does_not():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-up-a100.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs first
    gpu = config["available_node_types"]["a100x8"]
    assert gpu["node_config"]["InstanceType"] == "p4d.24xlarge" and gpu["resources"]["GPU"] == 8
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start  # loopback; `ray dashboard` forwards it
    broken = copy.deepcopy(config)
    broken["available_node_types"]["a100x8"]["max_wokers"] = 4
    with pytest.raises(Exception, match="max_wokers"):
        validate_config(prepare_config(broken))


def _docs(path):
    return list(yaml.safe_load_all(path.read_text()))


def _containers(pod_template):
    containers = pod_template["spec"]["containers"]
    assert containers and all(c["name"] and c["image"] for c in containers)
    return containers


def test_kuberay_raycluster_has_the_fields_the_crd_requires():
    docs = {d["kind"]: d for d in _docs(CLUSTER / "kuberay" / "raycluster.yaml")}
    assert set(docs) == {"RayCluster", "Deployment", "Service", "PersistentVolumeClaim"}
    rc = docs["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    spec = rc["spec"]
    import ray

    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # the CRD: map of strings
    _containers(head["template"])
    [group] = spec["workerGroupSpecs"]
    assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    [worker] = _containers(group["template"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == group["rayStartParams"]["num-gpus"] == "8"
    svc, deploy = docs["Service"], docs["Deployment"]
    assert svc["spec"]["type"] == "ClusterIP"  # MLflow inside the Kubernetes cluster only
    assert svc["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"] == \
        deploy["spec"]["template"]["metadata"]["labels"]
    [mlflow] = _containers(deploy["spec"]["template"])
    assert mlflow["command"][:2] == ["mlflow", "server"]
    claim = deploy["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    uri = f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    assert {"name": "MLFLOW_TRACKING_URI", "value": uri} in worker["env"]


def test_kuberay_rayjob_targets_the_raycluster_and_runs_a_valid_sweep(capsys):
    [job] = _docs(CLUSTER / "kuberay" / "rayjob.yaml")
    [cluster] = [d for d in _docs(CLUSTER / "kuberay" / "raycluster.yaml") if d["kind"] == "RayCluster"]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob") and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode")
    yaml.safe_load(spec["runtimeEnvYAML"])
    argv = spec["entrypoint"].split()
    assert argv[:3] == ["python", "-m", "plora_ray.tune"]
    from plora_ray.config.schema import ConfigError
    from plora_ray.config.sweep import load_sweep

    space = ROOT / argv[3]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    try:
        load_sweep(space, sets, check_paths=False)  # the sweep and its overrides are valid
    except ConfigError as exc:
        pytest.fail(str(exc))


def test_slurm_script_parses_and_starts_ray_mlflow_and_the_batch():
    script = CLUSTER / "slurm" / "plora_batch.sbatch"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    assert re.search(r"^#SBATCH --nodes=\d+", text, re.M) and "#SBATCH --gpus-per-node=8" in text
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r"ray start --head .*--dashboard-host=127\.0\.0\.1", code.replace("\\\n", " "))
    assert 'ray start --address="$RAY_ADDRESS"' in code
    assert "mlflow server --host \"$HEAD_IP\"" in code
    assert "python -m plora_ray.batch submit \"$BATCH\"" in code
    assert "python -m plora_ray.batch status \"$BATCH\"" in code and "--wait" in code
    assert "ray stop" not in code  # the allocation's end stops the nodes
    # the batch CLI accepts every call the script makes
    from plora_ray.cli.batch import build_parser

    calls = re.findall(r"python -m plora_ray\.batch (.*?)(?:\n(?!\s)|$)", code.replace("\\\n", " "))
    assert len(calls) == 2
    for call in calls:
        build_parser().parse_args(shlex.split(call))  # SystemExit on an unknown option


@pytest.mark.parametrize("name", ["example", "paper"])
def test_shipped_batch_files_validate(name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # working_dir "." is the repository root
    path = ROOT / "search_spaces" / "batches" / f"{name}.yaml"
    batch = load_batch(path, check_paths=False)
    assert len(batch.sweeps) >= 2
    assert batch_main(["submit", str(path), "--dry-run", "--no-path-checks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(batch.sweeps)
    for line in lines:
        assert " python -m plora_ray.tune search_spaces/" in line and "--storage " in line


def test_bad_batch_files_exit_2_with_one_line_before_any_submission(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "s.yaml"
    space.write_text((ROOT / "search_spaces" / "unload_tiny.yaml").read_text())
    good = {"working_dir": str(tmp_path), "storage": str(tmp_path / "sweeps"), "sweeps": [{"space": "s.yaml"}]}
    cases = {
        "unknown key": ({**good, "storrage": "/x"}, "did you mean 'storage'"),
        "relative storage": ({**good, "storage": "sweeps"}, "field 'storage'"),
        "missing space": ({**good, "sweeps": [{"space": "nope.yaml"}]}, "sweeps[0]: field 'space'"),
        "working_dir missing": ({**good, "working_dir": str(tmp_path / "nowhere")}, "not a directory"),
        "bad override": ({**good, "sweeps": [{"space": "s.yaml", "set": {"base.lora.rank": 0}}]},
                         "sweeps[0] (s): "),
        "same name twice": ({**good, "sweeps": [{"space": "s.yaml"}, {"space": "s.yaml"}]}, "used twice"),
        "no sweeps": ({**good, "sweeps": []}, "field 'sweeps'"),
    }
    (tmp_path / "sub").mkdir()
    cases["space outside working_dir"] = ({**good, "working_dir": str(tmp_path / "sub")}, "outside working_dir")
    for case, (data, fragment) in cases.items():
        path = tmp_path / "batch.yaml"
        path.write_text(yaml.safe_dump(data))
        # an address nothing listens on: validation fails first, so it is never contacted
        assert batch_main(["submit", str(path), "--address", "http://127.0.0.1:9"]) == 2, case
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (case, err)
