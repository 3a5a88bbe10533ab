"""The cluster recipes of cluster/ and the shipped batch files, checked where a checker exists:
Ray's own cluster-config schema, the structure KubeRay's CRDs require, ``bash -n`` and the
commands of the Slurm script; the batch files through the batch CLI's validation; the torch
range of pyproject.toml and cluster/Dockerfile (structurally: no Docker here) through pip's
own resolver. (Seconds; two pip dry-runs read the package index.)"""

import copy
import json
import re
import shlex
import subprocess
import sys
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
    assert gpu["node_config"]["InstanceType"] == "p4de.24xlarge" and gpu["resources"]["GPU"] == 8  # A100-80GB
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


# ---------------------------------------------------------------- the GPU install and its image

IMAGE_TAG = re.compile(r"docker build -f cluster/Dockerfile -t (\S+) \.")


def _torch_requirement():
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [req] = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    return req


def test_torch_requirement_is_a_range_that_admits_the_local_build_and_the_gpu_runs():
    import torch

    spec = _torch_requirement().specifier
    assert spec and not any(s.operator in ("==", "===") for s in spec), spec  # a range, not one build
    assert spec.contains(torch.__version__), (spec, torch.__version__)  # this machine's CPU build
    assert spec.contains("2.11.0+cu130")  # the GPU runs' build (bench/RESULTS.md)
    base = re.search(r"^ARG BASE=\S+:(\d+\.\d+\.\d+)-cuda", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert base and spec.contains(base.group(1)), "cluster/Dockerfile's base torch is outside the range"


def _pip(*args):
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode and re.search(r"NewConnectionError|Max retries|Temporary failure in name resolution",
                                     done.stderr):
        pytest.skip("no package index reachable: " + done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_a_fresh_install_here_resolves_torch_to_the_local_cpu_build(tmp_path):
    """What a fresh venv's `pip install -e .` would take for torch here (bench/RESULTS.md has the
    real fresh-venv install): the local CPU wheel, not a multi-GB CUDA build from the index."""
    import torch

    if "+cpu" not in torch.__version__:
        pytest.skip(f"torch {torch.__version__} here is not a local CPU build")
    report = tmp_path / "report.json"
    _pip("install", "--dry-run", "--ignore-installed", "--no-deps", "-q", "--report", str(report),
         str(_torch_requirement()))
    [torch_pick] = json.loads(report.read_text())["install"]
    assert torch_pick["metadata"]["version"] == torch.__version__, torch_pick["download_info"]["url"]


def test_the_project_installs_over_a_pinned_torch_without_replacing_it(tmp_path):
    """cluster/Dockerfile's install step, with this venv's torch as the image's: under the
    image's constraints (cluster/constraints.txt plus torch==the installed build) pip resolves
    the project without touching torch or anything installed."""
    import torch

    constraints = tmp_path / "constraints.txt"
    constraints.write_text((CLUSTER / "constraints.txt").read_text() + f"torch=={torch.__version__}\n")
    report = tmp_path / "report.json"
    _pip("install", "--dry-run", "-q", "--report", str(report), "-e", str(ROOT), "-c", str(constraints))
    from importlib.metadata import distributions

    from packaging.utils import canonicalize_name

    installs = {canonicalize_name(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]}
    assert "torch" not in installs and "plora-ray" in installs, installs
    replaced = installs & {canonicalize_name(d.metadata["Name"]) for d in distributions()} - {"plora-ray"}
    assert not replaced, replaced  # nothing already installed is swapped for another version


def _dockerfile_steps():
    """(instruction, argument) of cluster/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (CLUSTER / "Dockerfile").read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_keeps_the_base_images_cuda_torch_and_runs_pip_check():
    steps = _dockerfile_steps()
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG")
    froms = [a for op, a in steps if op == "FROM"]
    assert froms == ["${BASE}"]
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-devel", args["BASE"]), args["BASE"]
    runs = [(i, a) for i, (op, a) in enumerate(steps) if op == "RUN"]
    [(install_at, install)] = [(i, a) for i, a in runs if re.search(r"pip install .*-e \.", a)]
    # the constraint file gets the image's own torch, exactly, and is in force for the install
    env = {a.split("=", 1)[0]: (i, a.split("=", 1)[1]) for i, (op, a) in enumerate(steps) if op == "ENV"}
    env_at, constraint_file = env["PIP_CONSTRAINT"]
    assert env_at < install_at
    writes = [a for i, a in runs if i < env_at and f">> {constraint_file}" in a]
    assert writes and "torch=={torch.__version__}" in writes[0] and "torch.version.cuda" in writes[0]
    copies = [a.split() for op, a in steps if op == "COPY"]
    assert ["cluster/constraints.txt", constraint_file] in copies
    for i, a in runs:  # nothing installs, upgrades or reinstalls torch
        assert not re.search(r"pip install[^&]*(\btorch\b|--upgrade|-U\b|--force-reinstall|--no-constraint)", a), a
    parts = [part.strip() for part in install.split("&&")]
    at = next(i for i, part in enumerate(parts) if part.startswith("pip install"))
    assert parts[at + 1] == "pip check"  # right after the install, in the same layer
    assert "torch was replaced" in install


def test_every_recipe_runs_the_image_the_dockerfile_builds():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    tags = set(IMAGE_TAG.findall(dockerfile))
    assert len(tags) == 1, tags
    [tag] = tags
    assert f"docker push {tag}" in dockerfile
    # the tag says which torch and CUDA the base has
    torch_v, cuda_major, cuda_minor = re.search(r"^ARG BASE=\S+:(\d+\.\d+)\.\d+-cuda(\d+)\.(\d+)", dockerfile,
                                                re.M).groups()
    assert tag.endswith(f":torch{torch_v}-cu{cuda_major}{cuda_minor}"), tag
    # KubeRay: head, GPU workers and MLflow
    docs = _docs(CLUSTER / "kuberay" / "raycluster.yaml")
    rc = next(d for d in docs if d["kind"] == "RayCluster")["spec"]
    pods = [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]] + \
        [d["spec"]["template"] for d in docs if d["kind"] == "Deployment"]
    assert {c["image"] for p in pods for c in _containers(p)} == {tag}
    # ray up: every node in the image, nothing pip-installed over it
    ray_up = yaml.safe_load((CLUSTER / "ray-up-a100.yaml").read_text())
    assert ray_up["docker"]["image"] == tag
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                              "initialization_commands") for c in ray_up.get(key, [])]
    assert not any("pip install" in c for c in commands), commands
    # Slurm: the image by default, and every Ray / MLflow / Python command inside it
    slurm = (CLUSTER / "slurm" / "plora_batch.sbatch").read_text()
    assert f"IMAGE=${{PLORA_IMAGE:-{tag}}}" in slurm
    code = [line for line in slurm.replace("\\\n", " ").splitlines() if not line.lstrip().startswith("#")]
    tools = [line for line in code if re.search(r"\b(ray start|mlflow server|python)\b", line)]
    assert len(tools) == 6 and all('"${IN_IMAGE[@]}" ' in line for line in tools), tools
    assert "pip install" not in slurm
    # Ray in the image is the version the RayCluster names
    import ray

    assert f"ray=={rc['rayVersion']}" in (CLUSTER / "constraints.txt").read_text().split()
    assert rc["rayVersion"] == ray.__version__
