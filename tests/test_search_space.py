"""Sweep files: every mistake stops before a trial with one line naming the field; every shipped
file validates, and each of its trials builds a valid RunConfig."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from plora_ray.config.schema import ConfigError, RunConfig
from plora_ray.config.sweep import load_sweep
from plora_ray.config.trials import TRIAL_INDEX, trial_run_config, trial_values
from plora_ray.sweep.space import describe, trial_count, tune_param_space

ROOT = Path(__file__).resolve().parents[1]
MAIN_FILE = ROOT / "search_spaces" / "unload.yaml"  # the main job: SmolLM2, the embedded default
TINY_FILES = sorted(p for p in (ROOT / "search_spaces").glob("*.yaml") if p != MAIN_FILE)
PAPER_FILES = sorted((ROOT / "search_spaces" / "paper").glob("*.yaml"))
STUDY_FILES = sorted((ROOT / "search_spaces" / "study").glob("*.yaml"))
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASE = {"plora": {"unload_every_steps": 2}, "data": {"max_steps": 1, "max_length": 64}}


def sweep(**changes) -> dict:
    data = {"name": "t", "metric": "train/loss", "base": yaml.safe_load(yaml.safe_dump(BASE)),
            "space": {"plora.momentum": {"choice": [0.0, 0.1]}}}
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def space(**entries) -> dict:
    return {k.replace("__", "."): v for k, v in entries.items()}


BAD = [
    # (id, sweep file, --set overrides, fragment of the one-line message)
    ("unknown-top-key", sweep(sercher={"type": "random"}), [], "unknown key 'sercher': did you mean 'searcher'"),
    ("unknown-nested-key", sweep(searcher={"typ": "random"}), [], "unknown key 'searcher.typ': did you mean 'searcher.type'"),
    ("unknown-scheduler-key", sweep(scheduler={"type": "asha", "grace": 2}), [], "did you mean 'scheduler.grace_period'"),
    ("unknown-space-path", sweep(space=space(lora__rnk={"choice": [1, 2]})), [], "field 'space.lora.rnk': unknown run-config key 'lora.rnk': did you mean 'lora.rank'"),
    ("space-alias", sweep(space=space(optim__learning_rate={"choice": [1e-3]})), [], "did you mean 'optim.lr'"),
    ("space-section", sweep(space={"lora": {"choice": [1]}}), [], "field 'space.lora': 'lora' is a section"),
    ("unknown-distribution", sweep(space=space(optim__lr={"choise": [1e-3]})), [], "field 'space.optim.lr': unknown distribution 'choise': did you mean 'choice'"),
    ("two-distributions", sweep(space=space(lora__rank={"choice": [1], "grid": [2]})), [], "field 'space.lora.rank': has 2 distributions"),
    ("bare-value", sweep(space=space(lora__rank=4)), [], "field 'space.lora.rank': must be a distribution"),
    ("empty-choice", sweep(space=space(lora__rank={"choice": []})), [], "field 'space.lora.rank': choice needs at least one value"),
    ("empty-grid", sweep(space=space(lora__rank={"grid": []})), [], "field 'space.lora.rank': grid needs at least one value"),
    ("uniform-arity", sweep(space=space(plora__momentum={"uniform": [0.1]})), [], "field 'space.plora.momentum': uniform needs [low, high]"),
    ("uniform-low-above-high", sweep(space=space(plora__momentum={"uniform": [0.3, 0.1]})), [], "uniform needs low < high"),
    ("loguniform-zero", sweep(space=space(optim__lr={"loguniform": [0.0, 1e-3]})), [], "field 'space.optim.lr': loguniform needs low > 0"),
    ("int-fractional", sweep(space=space(lora__rank={"int": [1, 8.5]})), [], "int needs whole-number bounds"),
    ("uniform-on-int-field", sweep(space=space(lora__rank={"uniform": [1, 8]})), [], "field 'space.lora.rank': 'lora.rank' is a whole number"),
    ("momentum-one-in-choice", sweep(space=space(plora__momentum={"choice": [0.1, 1.0]})), [], "field 'space.plora.momentum': value 1.0 is rejected by the run config (field 'plora.momentum': Input should be less than 1"),
    ("momentum-range-reaches-one", sweep(space=space(plora__momentum={"uniform": [0.0, 1.0]})), [], "field 'space.plora.momentum': value 1.0"),
    ("rank-zero-in-choice", sweep(space=space(lora__rank={"choice": [0, 8]})), [], "field 'space.lora.rank': value 0"),
    ("rank-zero-in-int", sweep(space=space(lora__rank={"int": [0, 8]})), [], "field 'space.lora.rank': value 0"),
    ("lr-zero-in-grid", sweep(space=space(optim__lr={"grid": [1e-3, 0.0]})), [], "field 'space.optim.lr': value 0.0"),
    ("bad-momentum-rule", sweep(space=space(plora__momentum_rule={"choice": ["preserve", "fancy"]})), [], "field 'space.plora.momentum_rule': value 'fancy'"),
    ("bad-target-list", sweep(space=space(lora__target_modules={"choice": [["q_proj"], []]})), [], "field 'space.lora.target_modules': value []"),
    ("missing-base-file", sweep(base="no_such_run.yaml"), [], "field 'base': run config"),
    ("missing-base", sweep(base=None), [], "field 'base': Field required"),
    ("a-run-config", {"method": "lora", "lora": {"rank": 4}, "data": {"max_steps": 1}}, [],
     "a run config (keys data, lora, method), not a sweep file: train it with python -m plora_ray.train"),
    ("invalid-base", sweep(base={"lora": {"rank": 0}, **BASE}), [], "base: field 'lora.rank'"),
    ("missing-data-file", sweep(base={**BASE, "data": {"train_files": ["nope.jsonl"]}}), [], "file 'nope.jsonl' not found"),
    ("grid-under-optuna", sweep(searcher={"type": "optuna"}, space=space(lora__rank={"grid": [1, 8]})), [], "field 'space.lora.rank': grid cannot be used with searcher optuna"),
    ("choice-under-grid", sweep(searcher={"type": "grid"}), [], "field 'space.plora.momentum': searcher grid takes grid entries only"),
    ("unknown-searcher", sweep(searcher={"type": "bayes"}), [], "field 'searcher.type'"),
    ("metric-never-measured", sweep(metric="eval/mmlu/acc"), [], "field 'metric': eval/mmlu/acc is never measured: add mmlu to the base's eval.tasks"),
    ("unknown-metric", sweep(metric="eval/gsm8k/flex"), [], "field 'metric': unknown metric: did you mean 'eval/gsm8k/flexible'"),
    ("missing-metric", sweep(metric=None), [], "field 'metric': Field required"),
    ("bad-mode", sweep(mode="minimize"), [], "field 'mode'"),
    ("num-samples-zero", sweep(num_samples=0), [], "field 'num_samples'"),
    ("max-concurrent-zero", sweep(max_concurrent=0), [], "field 'max_concurrent'"),
    ("grace-above-max-t", sweep(scheduler={"type": "asha", "grace_period": 4, "max_t": 2}), [], "field 'scheduler': grace_period 4 is above max_t 2"),
    ("reduction-factor-one", sweep(scheduler={"type": "asha", "reduction_factor": 1}), [], "field 'scheduler.reduction_factor'"),
    ("workers-zero", sweep(resources={"workers": 0}), [], "field 'resources.workers'"),
    ("resource-path-in-space", sweep(space=space(distributed__workers={"choice": [1, 2]})), [], "set resources.workers instead"),
    ("joint-arity", sweep(space={"method, lora.rank": {"grid": [["lora", 1], ["plora"]]}}), [], "field 'space.method, lora.rank': value ['plora'] must be a list of 2 values"),
    ("joint-range", sweep(space={"lora.rank, optim.lr": {"uniform": [1, 2]}}), [], "a joint key takes choice or grid only"),
    ("joint-unknown-path", sweep(space={"method, lora.rnk": {"grid": [["lora", 1]]}}), [], "did you mean 'lora.rank'"),
    ("fixed-and-space", sweep(fixed={"plora.momentum": 0.1}), [], "'plora.momentum' is also set by fixed.plora.momentum"),
    ("fixed-unknown-path", sweep(fixed={"lora.rnk": 2}), [], "field 'fixed.lora.rnk'"),
    ("fixed-bad-value", sweep(fixed={"lora.rank": 0}), [], "field 'fixed': base + fixed + resources are rejected"),
    ("plora-without-unload-point", sweep(base={**BASE, "method": "lora", "plora": {}},
                                         space=space(method={"grid": ["lora", "plora"]})), [],
     "field 'space': the trial {method='plora'} is rejected by the run config (config: method plora needs an unload point"),
    ("override-unknown", sweep(), ["num_sample=2"], "did you mean 'num_samples'"),
    ("override-bad-space", sweep(), ["space.plora.momentum={choice: [2.0]}"], "field 'space.plora.momentum': value 2.0"),
    ("override-not-key-value", sweep(), ["num_samples"], "override 'num_samples' must look like key=value"),
]


@pytest.mark.parametrize("case_id,data,overrides,fragment", BAD, ids=[c[0] for c in BAD])
def test_bad_sweep_gives_one_line_naming_the_field(tmp_path, case_id, data, overrides, fragment):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_sweep(path, overrides)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert fragment in message


def test_not_yaml_and_missing_file_are_one_line(tmp_path):
    (tmp_path / "s.yaml").write_text("space: {lora.rank: {choice: [1\n")
    for path in (tmp_path / "s.yaml", tmp_path / "absent.yaml"):
        with pytest.raises(ConfigError) as err:
            load_sweep(path)
        assert "\n" not in str(err.value)


EXPECTED_TRIALS = {"unload_tiny": 8, "momentum": 6, "rank": 5, "lr": 7, "joint": 12}


def _points(spec, n_random=4):
    """Every point of a grid sweep (via Ray's own variant generator), else n random samples."""
    from ray.tune.search.sample import Domain
    from ray.tune.search.variant_generator import generate_variants

    domains = tune_param_space(spec)
    domains.pop(TRIAL_INDEX, None)  # repeats: the seed axis of a grid
    assert domains.keys() == spec.space.keys()
    assert all(isinstance(d, Domain) or set(d) == {"grid_search"} for d in domains.values())
    if spec.searcher.type == "optuna":
        return [{k: d.sample() for k, d in domains.items()} for _ in range(n_random)]
    return [config for _, config in generate_variants(domains)]


@pytest.mark.parametrize("path", TINY_FILES, ids=[p.stem for p in TINY_FILES])
def test_shipped_tiny_sweep_validates_and_every_trial_builds(path):
    assert path.read_text().startswith("#") and f"python -m plora_ray.tune search_spaces/{path.name}" in path.read_text()
    spec = load_sweep(path)
    assert trial_count(spec) == EXPECTED_TRIALS[path.stem]
    points = _points(spec)
    if spec.searcher.type != "optuna":
        assert len(points) * spec.num_samples == trial_count(spec)
    for i, params in enumerate(points):
        cfg = trial_run_config(spec, params, name=f"{spec.name}-{i}")
        assert isinstance(cfg, RunConfig) and cfg.name == f"{spec.name}-{i}"
        assert cfg.model.name_or_path == "tiny" and cfg.distributed.workers == 1
        assert not cfg.distributed.use_gpu
    assert describe(spec).startswith(f"sweep {spec.name}: {trial_count(spec)} trials")


@pytest.mark.parametrize("path", PAPER_FILES, ids=[p.stem for p in PAPER_FILES])
def test_shipped_paper_sweep_validates_at_paper_scale(path):
    assert f"python -m plora_ray.tune search_spaces/paper/{path.name}" in path.read_text()
    with pytest.raises(ConfigError, match="not found"):  # no LLaMA-7B or data mix here
        load_sweep(path)
    spec = load_sweep(path, check_paths=False)
    expected = dict(EXPECTED_TRIALS, joint=16, unload=8)[path.stem]
    assert trial_count(spec) == expected
    for params in _points(spec):
        cfg = trial_run_config(spec, params)
        d = cfg.distributed
        assert (d.workers, d.engine, d.zero_stage, d.use_gpu) == (8, "deepspeed", 2, True)
        assert cfg.global_batch_size == 24 and cfg.model.dtype == "bfloat16"
        assert cfg.checkpoint_every_steps == 100
        assert cfg.method != "plora" or cfg.plora.unload_every_samples


def test_joint_key_sets_every_path_of_a_row():
    spec = load_sweep(ROOT / "search_spaces" / "lr.yaml")
    key = "method, lora.target_modules, lora.rank, optim.lr"
    cfg = trial_run_config(spec, {key: ["plora", ALL7, 8, 5e-3]})
    assert (cfg.method, cfg.lora.target_modules, cfg.lora.rank, cfg.optim.lr) == ("plora", ALL7, 8, 5e-3)
    lora = trial_run_config(load_sweep(ROOT / "search_spaces" / "unload_tiny.yaml"),
                            {"method, plora.unload_every_samples": ["lora", None],
                             "lora.target_modules": ["q_proj", "v_proj"]})
    assert lora.method == "lora" and lora.plora.unload_every_samples is None


def test_resources_go_into_the_run_config_and_default_to_the_base(tmp_path):
    data = sweep(resources={"workers": 2, "cpus_per_worker": 0.5, "gpus_per_worker": 0.5})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    cfg = trial_run_config(load_sweep(tmp_path / "s.yaml"), {"plora.momentum": 0.1})
    assert (cfg.distributed.workers, cfg.distributed.cpus_per_worker, cfg.distributed.use_gpu) == (2, 0.5, True)
    data = sweep(base={**BASE, "distributed": {"workers": 3, "cpus_per_worker": 2}})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    spec = load_sweep(tmp_path / "s.yaml")
    assert (spec.resources.workers, spec.resources.cpus_per_worker, spec.resources.gpus_per_worker) == (3, 2, 0)


def test_base_path_is_relative_to_the_sweep_file_and_overridable(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "run.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "s.yaml").write_text(yaml.safe_dump(sweep(base="../runs/run.yaml")))
    monkeypatch.chdir(ROOT)
    spec = load_sweep(tmp_path / "sweeps" / "s.yaml",
                      ["num_samples=2", "base.data.max_steps=4", "space.lora.rank={int: [1, 4]}",
                       "space.plora.momentum=null", "fixed.seed=7"])
    assert spec.num_samples == 2 and set(spec.space) == {"lora.rank"}
    cfg = trial_run_config(spec, {"lora.rank": 4})
    assert (cfg.data.max_steps, cfg.lora.rank, cfg.seed) == (4, 4, 7)
    assert spec.searcher.type == "optuna" and spec.name == "t"


def test_defaults_mode_from_metric_and_searcher_from_space(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep(metric="eval/mmlu/acc", name=None, base={**BASE, "eval": {"tasks": ["mmlu"]}},
                                         space=space(lora__rank={"grid": [1, 8]}))))
    spec = load_sweep(path)
    assert (spec.mode, spec.searcher.type, spec.name, trial_count(spec)) == ("max", "grid", "s", 2)
    assert load_sweep(path, ["metric=train/loss"]).mode == "min"


@pytest.mark.parametrize("metric,expect", [("eval/heldout/loss", "min"), ("train/loss", "min"),
                                           ("eval/arc_easy/acc", "max"), ("eval/gsm8k/strict", "max")])
def test_mode_defaults_to_the_metrics_direction(tmp_path, metric, expect):
    """A loss is minimised, an accuracy maximised, when the file leaves mode out (a sweep on
    eval/heldout/loss used to maximise it)."""
    path = tmp_path / "s.yaml"
    base = {**BASE, "eval": {"tasks": ["arc_easy", "gsm8k"], "heldout": {"fraction": 0.1}}}
    path.write_text(yaml.safe_dump(sweep(metric=metric, base=base)))
    assert load_sweep(path).mode == expect
    assert load_sweep(path, [f"mode={'max' if expect == 'min' else 'min'}"]).mode != expect  # given: kept


def test_direction_is_min_for_every_loss_metric():
    from plora_ray.config.names import METRICS, direction

    assert {m: direction(m) for m in METRICS if "loss" in m} == {
        "train/loss": "min", "eval/heldout/loss": "min", "eval/train/loss": "min"}
    assert all(direction(m) == "max" for m in METRICS if "loss" not in m)
    assert direction("eval/other/val_loss") == "min" and direction("eval/loss_free/acc") == "max"


def test_yaml_text_bounds_like_1e_4_are_numbers(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("metric: train/loss\nbase: {plora: {unload_every_steps: 2}}\n"
                    "space: {optim.lr: {loguniform: [1e-4, 1e-2]}}\n")
    assert tune_param_space(load_sweep(path))["optim.lr"].lower == pytest.approx(1e-4)


def test_loading_a_sweep_does_not_import_ray():
    code = ("import sys; from plora_ray.config.sweep import load_sweep; "
            "load_sweep('search_spaces/joint.yaml'); assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_error_in_a_base_file_names_the_base_file(tmp_path):
    (tmp_path / "run.yaml").write_text("lora: {rnk: 4}\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep(base="run.yaml")))
    with pytest.raises(ConfigError) as err:
        load_sweep(tmp_path / "s.yaml")
    assert str(err.value) == (f"{tmp_path / 's.yaml'}: base ({tmp_path / 'run.yaml'}): "
                              "unknown key 'lora.rnk': did you mean 'lora.rank'?")


def test_main_sweep_runs_smollm2_on_the_embedded_mix_and_scores_the_heldout_loss():
    spec = load_sweep(MAIN_FILE)
    assert trial_count(spec) == spec.max_concurrent == 2  # two slots, one trial each
    assert spec.metric == "eval/heldout/loss" and spec.mode == "min"
    methods = set()
    for params in _points(spec):
        cfg = trial_run_config(spec, params)
        methods.add(cfg.method)
        assert cfg.model.name_or_path == "smollm2-135m-instruct"
        assert cfg.data.train_files == ["embedded-mix-small"] and cfg.eval.heldout.files is None  # GSM8K held out
        assert cfg.data.packing
        assert cfg.eval.tasks == ["arc_easy", "mmlu", "gsm8k"] and cfg.eval.final_only_tasks == []
        assert cfg.data.max_steps // cfg.checkpoint_every_steps >= 4  # curves, not dots
        assert cfg.data.max_steps * cfg.data.micro_batch_size <= 300  # one pass over the 300 rows
    assert methods == {"plora", "lora"}


def test_main_sweep_scores_every_benchmark_at_every_checkpoint():
    """What --dry-run says of the main job: at least 4 checkpoints, each scoring the held-out loss,
    ARC-Easy, MMLU and GSM8K (the mission's curves), none of them at the last checkpoint only."""
    lines = describe(load_sweep(MAIN_FILE)).splitlines()
    when = next(l for l in lines if l.startswith("checkpoints (first trial): "))
    count = int(when.split(": ")[1].split(",")[0])
    assert count >= 4 and "at steps 6, 12, 18, 24 of 24 (data.max_steps; " in when
    scored = next(l for l in lines if l.startswith("scored at checkpoints (first trial): "))
    parts = scored.split(": ", 1)[1].split("; ")
    assert parts[0] == "held-out loss"
    assert [p.split(" ")[0] for p in parts[1:]] == ["arc_easy", "mmlu", "gsm8k"]
    assert not any("last checkpoint only" in p for p in parts)
    assert parts[3].endswith("the first 8 not in the held-out loss)")  # GSM8K items disjoint from it


def test_dry_run_names_the_checkpoint_steps():
    from plora_ray.sweep.space import describe_checkpoints

    cfg = trial_run_config(load_sweep(MAIN_FILE), {"method, plora.unload_every_samples": ["lora", None]})
    bound = "(data.max_steps; should {} of the data end sooner, the run stops there with its last checkpoint)"
    assert describe_checkpoints(cfg) == "4, at steps 6, 12, 18, 24 of 24 " + bound.format("1 epoch")
    data = cfg.model_dump()
    data["data"]["max_steps"], data["checkpoint_every_steps"], data["data"]["epochs"] = 25, 6, 2
    assert describe_checkpoints(type(cfg).model_validate(data)) == "5, at steps 6, 12, 18, 24, 25 of 25 " + bound.format(
        "2 epochs")
    data["data"]["max_steps"] = None
    assert describe_checkpoints(type(cfg).model_validate(data)) == "every 6 steps and at the end"
    data["checkpoint_every_steps"] = None
    assert describe_checkpoints(type(cfg).model_validate(data)) == "at the end"


def test_trial_values_split_joint_keys_into_mlflow_param_names():
    values = trial_values({"method, plora.unload_every_samples": ["lora", None], "optim.lr": 1e-3})
    assert values == {"method": "lora", "plora.unload_every_samples": None, "optim.lr": 1e-3}


@pytest.mark.parametrize("name", ["unload", "joint"])
def test_spec_survives_a_json_round_trip_into_a_trial(name):
    """tune.py ships the spec to trials as JSON and rebuilds it there."""
    from plora_ray.config.spec import SweepSpec

    spec = load_sweep(ROOT / "search_spaces" / f"{name}.yaml")
    again = SweepSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json"))))
    assert again.model_dump() == spec.model_dump()
    params = {k: d.values[0] for k, d in spec.space.items()}
    assert trial_run_config(again, params) == trial_run_config(spec, params)


# ---------------------------------------------------------------------------- preflight
# What the schema cannot see alone, checked by plora_ray.sweep.preflight before Ray starts (and by
# --dry-run): files that are not YAML text, repeated keys, out-of-range seeds, the model and
# target modules of every trial, the data files, the storage and --resume.
CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
RUN_TEXT = "plora: {unload_every_steps: 2}\ndata: {max_steps: 1, max_length: 64}\n"
SWEEP_TEXT = "metric: train/loss\nbase: run.yaml\nspace:\n  plora.momentum: {choice: [0.0, 0.1]}\n"


def with_base(**base) -> str:
    return yaml.safe_dump(sweep(base={**BASE, **base}), sort_keys=False)


def with_space(**entries) -> str:
    return yaml.safe_dump(sweep(space=space(**entries)), sort_keys=False)


NO_ASSISTANT = '{"messages": [{"role": "user", "content": "hi"}]}\n'
PREFLIGHT = [
    # (id, sweep.yaml text or bytes, other files {name: text | bytes}, tune argv, fragment)
    ("sweep-binary", b"\x00\x01\x02\xff\xfe binary", {}, [], "sweep.yaml: not a text YAML file"),
    ("sweep-nul-bytes", SWEEP_TEXT + "\x00", {"run.yaml": RUN_TEXT}, [], "sweep.yaml: not a text YAML file (it holds NUL bytes)"),
    ("sweep-duplicate-top-key", SWEEP_TEXT + "metric: eval/mmlu/acc\n", {"run.yaml": RUN_TEXT}, [],
     "sweep.yaml line 5: key 'metric' is given twice in the same mapping"),
    ("sweep-duplicate-space-key", SWEEP_TEXT + "  plora.momentum: {choice: [0.2]}\n", {"run.yaml": RUN_TEXT}, [],
     "sweep.yaml line 5: key 'plora.momentum' is given twice"),
    ("sweep-duplicate-in-distribution", "metric: train/loss\nbase: run.yaml\nspace:\n  lora.rank: {choice: [1], choice: [2]}\n",
     {"run.yaml": RUN_TEXT}, [], "key 'choice' is given twice"),
    ("base-file-duplicate-key", SWEEP_TEXT, {"run.yaml": RUN_TEXT + "plora: {unload_every_steps: 4}\n"}, [],
     "run.yaml line 3: key 'plora' is given twice"),
    ("base-file-binary", SWEEP_TEXT, {"run.yaml": b"\xff\xd8\xff\xe0 jpeg"}, [], "run.yaml: not a text YAML file (byte 0xff"),
    ("searcher-seed-above-numpy-range", yaml.safe_dump(sweep(searcher={"seed": 2**32})), {}, [],
     "field 'searcher.seed': Input should be less than or equal to 4294967295"),
    ("base-seed-above-64-bit", with_base(seed=2**64), {}, [], "base: field 'seed': Input should be less than or equal to"),
    ("space-seed-negative", with_space(seed={"choice": [0, -1]}), {}, [], "field 'space.seed': value -1 is rejected"),
    ("base-model-not-found-offline", with_base(model={"name_or_path": "no-such-org/no-such-model"}), {}, [],
     "sweep.yaml: base: field 'model.name_or_path': 'no-such-org/no-such-model' is not a local directory and not in the hub cache"),
    ("base-model-dir-without-config", with_base(model={"name_or_path": "./empty_model"}), {"empty_model/README": "x"}, [],
     "base: field 'model.name_or_path': './empty_model' is not a model directory"),
    ("space-model-choice-not-found", with_space(model__name_or_path={"choice": ["tiny", "no-such-org/m"]}), {}, [],
     "sweep.yaml: trial model.name_or_path='no-such-org/m': field 'model.name_or_path'"),
    ("base-target-one-of-two-missing", with_base(lora={"target_modules": ["q_proj", "nonexistent_proj"]}), {}, [],
     "sweep.yaml: base: field 'lora.target_modules': 'nonexistent_proj' matches no module of the model"),
    ("base-target-not-a-layer", with_base(lora={"target_modules": ["mlp"]}), {}, [], "'mlp' names LlamaMLP modules, which LoRA cannot adapt"),
    ("space-target-choice-one-bad", with_space(lora__target_modules={"choice": [["q_proj"], ["q_proj", "v_prj"]]}), {}, [],
     "trial lora.target_modules=['q_proj', 'v_prj']: field 'lora.target_modules': 'v_prj' matches no module of the model (did you mean 'v_proj'?)"),
    ("joint-key-target-bad", yaml.safe_dump(sweep(space={"method, lora.target_modules": {"grid": [["lora", ["q_proj"]], ["plora", ["x_proj"]]]}},
                                                  searcher={"type": "grid"})), {}, [], "'x_proj' matches no module"),
    ("space-model-and-targets-combined", with_space(model__tiny__hidden_size={"choice": [64, 66]}), {}, [],
     "trial model.tiny.hidden_size=66: field 'model.tiny': hidden_size must divide"),
    ("base-data-no-assistant", with_base(data={"max_steps": 1, "train_files": ["d.jsonl"]}), {"d.jsonl": CHAT + NO_ASSISTANT}, [],
     "sweep.yaml: base: d.jsonl:2: no assistant message to learn from"),
    ("base-data-binary", with_base(data={"max_steps": 1, "train_files": ["d.jsonl"]}), {"d.jsonl": b"\x80\x81\x82"}, [],
     "base: d.jsonl: not UTF-8 text (byte 0x80 at offset 0)"),
    ("base-data-empty", with_base(data={"max_steps": 1, "train_files": ["d.jsonl"]}), {"d.jsonl": ""}, [], "d.jsonl: the file holds no rows"),
    ("base-data-invalid-json", with_base(data={"max_steps": 1, "train_files": ["d.jsonl"]}), {"d.jsonl": CHAT + "{oops\n"}, [],
     "d.jsonl:2: invalid JSON"),
    ("space-data-choice-one-empty", with_space(data__train_files={"choice": [["tiny-dialogues"], ["e.jsonl"]]}), {"e.jsonl": "\n"}, [],
     "trial data.train_files=['e.jsonl']: e.jsonl: the file holds no rows"),
    ("storage-is-a-file", with_space(), {"store": "keep me"}, ["--storage", "store"], "--storage '"),
    ("storage-under-a-file", with_space(), {"store": "keep me"}, ["--storage", "store/sweeps"], "cannot be created: '"),
    ("storage-not-writable", with_space(), {}, ["--storage", "/proc/plora-ray-no-such/sweeps"], "is not writable"),
    ("resume-without-earlier-sweep", with_space(), {}, ["--resume"], "--resume: no earlier sweep of 't' under"),
    ("resume-other-sweep-only", with_space(), {"sweeps/other.latest.json": "{}"}, ["--resume"], "no earlier sweep of 't'"),
    ("tracking-uri-not-writable", with_space(), {}, ["--tracking-uri", "sqlite:////proc/plora-ray-no-such/mlflow.db"],
     "--tracking-uri directory '/proc/plora-ray-no-such' is not writable"),
]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


@pytest.mark.parametrize("case_id,text,files,argv,fragment", PREFLIGHT, ids=[c[0] for c in PREFLIGHT])
def test_preflight_refuses_a_sweep_with_one_line_before_ray(tmp_path, capsys, monkeypatch, case_id, text, files,
                                                            argv, fragment):
    """Through the CLI's --dry-run (the same checks run before Ray starts): exit 2, one line,
    no storage created, no file changed."""
    import huggingface_hub.constants

    from plora_ray.cli.tune import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    for name, content in {"sweep.yaml": text, **files}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    before = _snapshot(tmp_path)
    code = main(["sweep.yaml", "--dry-run", "--storage", "sweeps", *argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert _snapshot(tmp_path) == before



def test_an_mlflow_setting_mlflow_cannot_read_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    """MLflow reads ``MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS`` as an integer inside its logging
    thread: 0.5 killed that thread and every later wait for a logged batch hung. Refused first."""
    from plora_ray.cli.tune import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep.yaml").write_text(with_space())
    monkeypatch.setenv("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "0.5")
    code = main(["sweep.yaml", "--dry-run", "--storage", "sweeps"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0] == ("error: environment variable MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS='0.5': MLflow reads it "
                      "as int: give such a value, or unset it")
    assert not (tmp_path / "sweeps").exists()
    monkeypatch.setenv("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")  # an integer passes
    assert main(["sweep.yaml", "--dry-run", "--storage", "sweeps"]) == 0

def test_sweep_cli_fails_before_ray_in_seconds(tmp_path):
    """Without --dry-run: exit 2, one line, no traceback, no storage, and Ray never started."""
    (tmp_path / "sweep.yaml").write_text(with_base(lora={"target_modules": ["q_proj", "nonexistent_proj"]}))
    code = ("import sys; from plora_ray.cli.tune import main; rc = main(['sweep.yaml']); "
            "assert 'ray' not in sys.modules, 'Ray was imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "nonexistent_proj" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


def test_study_sweeps_share_one_budget_and_protocol():
    """docs/study.md: every run of the three study sweeps trains on the same samples (>= 600)
    and is scored on the same held-out problems at the same (>= 8) checkpoints."""
    assert [p.stem for p in STUDY_FILES] == ["final", "lora_lr", "plora"]
    protocols, methods = set(), {}
    for path in STUDY_FILES:
        assert f"python -m plora_ray.tune search_spaces/study/{path.name}" in path.read_text()
        spec = load_sweep(path)
        assert spec.metric == "eval/heldout/loss" and spec.mode == "min"
        for params in _points(spec):
            cfg = trial_run_config(spec, params)
            d = cfg.data
            samples = d.max_steps * cfg.global_batch_size
            assert samples >= 600 and d.max_steps // cfg.checkpoint_every_steps >= 8
            assert cfg.model.name_or_path == "smollm2-135m-instruct" and cfg.lora.rank == 1
            protocols.add((samples, cfg.checkpoint_every_steps, d.max_length, tuple(d.train_files),
                           cfg.eval.heldout.limit, tuple(cfg.lora.target_modules)))
            methods.setdefault(path.stem, set()).add(cfg.method)
    assert len(protocols) == 1
    assert methods == {"lora_lr": {"lora"}, "plora": {"plora"}, "final": {"lora", "plora"}}
    final = load_sweep(ROOT / "search_spaces" / "study" / "final.yaml")
    assert final.repeats == 3 and trial_count(final) == 6


def test_dry_run_says_which_gsm8k_items_each_run_scores(tmp_path):
    base = {**BASE, "method": "plora", "eval": {"tasks": ["gsm8k"], "limit": None}}
    for train_files, expected in ((["tiny-dialogues"], "gsm8k (GSM8K's test set, 1,319 problems: all items)"),
                                  (["embedded-mix-small"], "gsm8k (the 319 GSM8K problems the embedded mix never trains on")):
        path = tmp_path / "s.yaml"
        data = sweep(base={**base, "data": {**BASE["data"], "train_files": train_files}})
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        assert expected in describe(load_sweep(path)).splitlines()[-1]



def test_dry_run_names_harness_tasks_and_when_they_run():
    from plora_ray.config.io import build_run_config
    from plora_ray.sweep.space import describe_eval

    cfg = build_run_config({"plora": {"unload_every_steps": 2},
                            "eval": {"tasks": ["arc_easy"], "limit": 5, "harness": {"tasks": ["hellaswag"], "limit": 7,
                                                                                    "at": "last"}}})
    assert describe_eval(cfg) == ("arc_easy (test set: the first 5); hellaswag (lm-eval: the first 7, last "
                                  "checkpoint only)")


def test_study_part_two_sweeps_share_one_protocol():
    """docs/study.md, part 2: every run of search_spaces/study/headroom/ trains on the same 64
    GSM8K dialogues for the same epochs and is scored on the same training-set and held-out
    examples at the end of every epoch; LoRA and full fine-tuning are both in it."""
    files = sorted((ROOT / "search_spaces" / "study" / "headroom").glob("*.yaml"))
    assert files
    protocols, methods = set(), set()
    for path in files:
        assert f"python -m plora_ray.tune search_spaces/study/headroom/{path.name}" in path.read_text()
        spec = load_sweep(path)
        for params in _points(spec):
            cfg = trial_run_config(spec, params)
            d, e = cfg.data, cfg.eval
            steps_per_epoch = -(-d.sources[0].max_rows // cfg.global_batch_size)
            assert cfg.checkpoint_every_steps == steps_per_epoch and d.epochs >= 4
            assert e.train_loss is not None and e.train_loss.limit is None  # every training example
            protocols.add((d.model_dump_json(include={"sources", "max_length", "epochs", "micro_batch_size"}),
                           cfg.global_batch_size, e.heldout.limit, cfg.model.name_or_path, cfg.lora.rank,
                           tuple(cfg.lora.target_modules)))
            methods.add(cfg.method)
    assert len(protocols) == 1
    assert {"lora", "full"} <= methods
