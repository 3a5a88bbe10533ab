"""Every input checked before any work starts: a run or sweep that would fail fails here, in
the driver, in about a second, with one line naming the field or file and the fix, and with
nothing written.

Beyond what the config schemas check alone (``config/schema.py``, ``config/sweep.py``):

* output and storage directories: not a file, creatable and writable (probed with a temporary
  file that is removed again), so results are never lost at the end of a run; a storage URI
  (``s3://``, ``gs://``) is only checked to be one Ray's filesystems open;
* ``--resume`` names a directory (or sweep) that holds a run;
* the base model: its module tree built on the meta device (no weights read), and every name in
  ``lora.target_modules`` matching a layer LoRA can wrap;
* the training files: read and normalised row by row as training will (no tokenizer).
* ``eval.datasets``: each user copy of a benchmark read whole, with its task's columns.
* GPU memory: each trial's estimated peak per GPU (:mod:`plora_ray.run.memory`, from the
  model's config) fits ``resources.gpu_memory_gb`` (a single run: the GPUs present), else the
  knob that would make it fit is named.

A sweep checks every distinct model / target list / file list a trial can get.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from plora_ray.config.paths import cache_root
from plora_ray.config.schema import ConfigError, RunConfig
from plora_ray.assets.dialogues import DataError
from plora_ray.assets.sources import check_data

# what a run directory holds once it has started (train.py writes them before the first step)
RUN_MARKERS = ("ray_run_name", "config.yaml")
# run-config paths whose values decide what check_model / check_files look at
MODEL_AND_DATA_PATHS = ("model", "method", "lora.target_modules", "data.train_files", "data.sources",
                        "eval.datasets")
# ... and those the memory estimate depends on (plora_ray.run.memory)
MEMORY_PATHS = ("model", "method", "lora", "data.micro_batch_size", "data.max_length", "distributed",
                "plora.measure_output_change", "eval")


def check_writable(path: str | os.PathLike, what: str) -> None:
    """``path`` is a directory, or can be created as one, and files can be written in it.
    The probe file is removed again: nothing is left behind."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} '{path}' is a file, not a directory: give a directory path")
    parent = path
    while not parent.exists():  # the nearest part of the path that exists
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} '{path}' cannot be created: '{parent}' is a file: give another path")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".plora-ray-write-test-")
    except OSError as exc:
        raise ConfigError(f"{what} '{path}' is not writable ({exc.strerror} in '{parent}'): give a "
                          "writable path") from None
    os.close(fd)
    os.unlink(probe)


def data_cache(cfg: RunConfig) -> Path:
    """Where datasets caches what preflight reads (the run's own cache: read once, reused)."""
    return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else cache_root() / "datasets"


def check_model(cfg: RunConfig) -> None:
    """The base model exists, every ``lora.target_modules`` name matches a layer LoRA can wrap
    (checked on a meta-device skeleton, so even a 7B model costs a fraction of a second), and its
    tokenizer loads and renders the chat template with an assistant-only mask."""
    from plora_ray.run.compiled import decoder_layers
    from plora_ray.run.models import check_attention, check_target_modules, check_tokenizer, model_skeleton

    check_attention(cfg)  # flash_attention_2 where it cannot run
    skeleton = model_skeleton(cfg.model)
    if cfg.method != "full":
        check_target_modules(skeleton, cfg.lora.target_modules)
    if cfg.model.compile:  # regional compilation needs the model's decoder layers
        decoder_layers(skeleton, cfg.model.name_or_path)
    check_tokenizer(cfg.model)


def check_harness(cfg: RunConfig) -> None:
    """Every ``eval.harness.tasks`` name is a task, group or tag lm-eval knows (its registry
    plus ``eval.harness.include_path``); ConfigError naming the field, with a did-you-mean."""
    if not cfg.eval.harness.tasks:
        return
    from plora_ray.evaluation.harness import check_harness_tasks  # lm-eval: only here

    try:
        check_harness_tasks(cfg.eval.harness.tasks, cfg.eval.harness.include_path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_eval_datasets(cfg: RunConfig) -> None:
    """Every ``eval.datasets`` copy opens through ``datasets`` with its task's columns and valid
    rows (read whole: they are the items scored); ConfigError naming ``eval.datasets.<task>``."""
    from plora_ray.assets.copies import load_copy
    from plora_ray.assets.fetch import AssetError

    for task, copy in cfg.eval.datasets.items():
        try:
            load_copy(task, copy.path, copy.name, copy.split)
        except AssetError as exc:
            raise ConfigError(str(exc)) from None


def check_run(cfg: RunConfig, output_dir: str | os.PathLike, resume: bool = False) -> None:
    """Everything a training run needs, before it starts; raises ConfigError / DataError."""
    out = Path(output_dir)
    check_writable(out, "output directory")
    if resume:
        if not out.is_dir() or not any((out / m).exists() for m in RUN_MARKERS):
            raise ConfigError(f"--resume: '{out}' holds no run to continue (no {' or '.join(RUN_MARKERS)} "
                              "in it): give the --output of an earlier run, or drop --resume")
    elif out.is_dir() and any(out.iterdir()):
        check_writable(out.parent, "output directory")  # a new run goes beside it (out-2)
    if cfg.distributed.storage_path:
        check_writable(cfg.distributed.storage_path, "field 'distributed.storage_path':")
    check_model(cfg)
    check_deepspeed(cfg)
    check_harness(cfg)
    check_eval_datasets(cfg)
    check_data(cfg.data, data_cache(cfg))
    check_run_memory(cfg)


def check_deepspeed(cfg: RunConfig) -> None:
    """``distributed.deepspeed_config``: the user's JSON read, merged with the run config (a key
    both set differently is refused) and validated by DeepSpeed's own config classes."""
    if cfg.distributed.engine == "deepspeed" and cfg.distributed.deepspeed_config:
        from plora_ray.run.dsconfig import check_deepspeed_config  # deepspeed: only here

        check_deepspeed_config(cfg)


def check_sweep(spec, storage_dir: str | os.PathLike, resume: bool = False,
                tracking_uri: str | None = None) -> None:
    """Everything a sweep needs, before Ray starts: the storage, ``--resume``, and the model and
    data of every trial (each distinct value once); raises ConfigError / DataError."""
    from plora_ray.ray.cluster import is_uri
    from plora_ray.config.trials import trial_points, trial_run_config
    from plora_ray.tracking.driver import check_mlflow_environment

    if is_uri(storage_dir):  # s3://, gs://...: Ray writes it; only a local path is probed here
        if not tracking_uri:
            raise ConfigError(f"--storage {storage_dir}: the default tracking store is a SQLite file under "
                              "a local --storage: give --tracking-uri (an MLflow server, http://HOST:PORT)")
        check_storage_uri(str(storage_dir))
    else:
        storage = Path(storage_dir)
        check_writable(storage, "--storage")
        if resume and not (storage / f"{spec.name}.latest.json").is_file():
            raise ConfigError(f"--resume: no earlier sweep of '{spec.name}' under {storage.absolute()}: run it "
                              "without --resume, or give its --storage")
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        check_writable(Path(tracking_uri.removeprefix("sqlite:///")).parent, "--tracking-uri directory")
    check_mlflow_environment()
    if not spec._check_paths:
        return
    try:
        check_harness(trial_run_config(spec, {}))  # the base's lm-eval tasks
    except ConfigError as exc:
        raise ConfigError(f"{spec._source}: base: {exc}") from None
    src, models, files, copies = spec._source, set(), set(), set()
    for point in trial_points(spec, MODEL_AND_DATA_PATHS):
        cfg = trial_run_config(spec, point)
        where = "base" if not point else "trial " + ", ".join(f"{k}={v!r}" for k, v in point.items())
        model_key = (cfg.model.model_dump_json(), cfg.method, tuple(cfg.lora.target_modules))
        try:
            if model_key not in models:
                models.add(model_key)
                check_model(cfg)
            if tuple(cfg.data.train_files) not in files:
                files.add(tuple(cfg.data.train_files))
                check_data(cfg.data, data_cache(cfg))
            if cfg.eval.model_dump_json(include={"datasets"}) not in copies:
                copies.add(cfg.eval.model_dump_json(include={"datasets"}))
                check_eval_datasets(cfg)
        except (ConfigError, DataError) as exc:
            raise type(exc)(f"{src}: {where}: {exc}") from None
    checked = set()  # the user's DeepSpeed JSON against every trial's batch, precision, stage, optimizer
    for point in trial_points(spec):
        cfg = trial_run_config(spec, point)
        key = (cfg.model.dtype, cfg.data.model_dump_json(), cfg.optim.model_dump_json(),
               cfg.distributed.model_dump_json())
        if cfg.distributed.deepspeed_config and key not in checked:
            checked.add(key)
            try:
                check_deepspeed(cfg)
            except ConfigError as exc:
                where = "base" if not point else "trial " + ", ".join(f"{k}={v!r}" for k, v in point.items())
                raise ConfigError(f"{src}: {where}: {exc}") from None
    sweep_memory(spec)


def check_run_memory(cfg: RunConfig):
    """A GPU run's estimated peak per GPU fits the GPUs present (a CPU run, or no GPU here: not
    checked, None); ConfigError naming the knob that would make it fit."""
    from plora_ray.run.memory import check_fit, gpu_memory_present

    gib = gpu_memory_present() if cfg.distributed.use_gpu else None
    return check_fit(cfg, gib * min(1.0, cfg.distributed.gpus_per_worker or 1.0)) if gib else None


def sweep_memory(spec) -> list[str]:
    """One line per distinct trial: its estimated peak per worker, of the GPU memory
    (``resources.gpu_memory_gb``, else the GPUs present); ConfigError naming the trial and the
    knob that would make it fit for the first that does not (before Ray starts)."""
    from plora_ray.config.trials import key_paths, trial_points, trial_run_config, trial_values
    from plora_ray.run.memory import check_fit, estimate, gpu_memory_present

    r = spec.resources
    gib = (r.gpu_memory_gb or gpu_memory_present()) if r.gpus_per_worker else None
    capacity = gib * min(1.0, r.gpus_per_worker) if gib else None
    touching = {key for key in spec.space if any(p == t or p.startswith(t + ".") for p in key_paths(key)
                                                  for t in MEMORY_PATHS)}
    points = [p for p in trial_points(spec, MEMORY_PATHS) if set(p) == touching] or [{}]
    lines, seen = [], set()
    for point in points:
        cfg = trial_run_config(spec, point)
        where = "trial " + ", ".join(f"{k}={v!r}" for k, v in trial_values(point).items()) if point else "every trial"
        try:
            est = check_fit(cfg, capacity) if capacity else estimate(cfg)
        except ConfigError as exc:
            here = "" if r.gpu_memory_gb else f" (the GPUs here: {gib:.0f} GiB; resources.gpu_memory_gb sets the cluster's)"
            raise ConfigError(f"{spec._source}: {where}: {exc}{here}") from None
        summary = est.summary(capacity, "GPU" if r.gpus_per_worker else "worker (CPU: not checked)")
        if summary not in seen:  # trials that differ in nothing the estimate reads: once
            seen.add(summary)
            lines.append(f"  {where}: {summary}")
    return lines


# URI schemes Ray's storage_path takes (pyarrow filesystems); opening one may need the network
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")


def check_storage_uri(uri: str) -> None:
    """A storage URI of a scheme Ray's storage layer (pyarrow) writes. Nothing is opened here:
    an object store may be reachable only from the cluster; access shows when Ray writes."""
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in STORAGE_SCHEMES:
        raise ConfigError(f"--storage {uri}: '{scheme}://' is not a storage Ray writes: give a local path "
                          "every node mounts, s3://BUCKET/PATH or gs://BUCKET/PATH")


class SweepFailed(Exception):
    """Every trial of a sweep failed: ``str()`` is one line, ``summary`` the sweep's table."""

    def __init__(self, message: str, summary: str):
        super().__init__(message)
        self.summary = summary


def raise_if_every_trial_failed(results, summary: str) -> None:
    """SweepFailed (the CLI exits 1) when no trial of ``results`` (a Ray ResultGrid) succeeded."""
    errors = [r.error for r in results if r.error is not None]
    if not errors or len(errors) < len(results):
        return
    lines = [line.strip() for line in str(errors[0]).splitlines() if line.strip()]
    reason = lines[-1][:300] if lines else type(errors[0]).__name__
    raise SweepFailed(f"all {len(errors)} trial(s) failed; the first: {reason}: see the trial logs "
                      "above", summary)
