"""Export a trained checkpoint as a Hugging Face model folder (or as an adapter to the base model).

    python -m plora_ray.export CHECKPOINT OUT                    # merged model, bfloat16 shards
    python -m plora_ray.export CHECKPOINT OUT --dtype float32
    python -m plora_ray.export CHECKPOINT OUT --adapter          # peft adapter + unload ledger
    python -m plora_ray.export CHECKPOINT OUT --push-to-hub ME/my-model

CHECKPOINT: a checkpoint directory (``state.json`` in it: a Ray trial's ``checkpoint_...`` folder,
or a run's ``checkpoint/``), a run's output directory (``python -m plora_ray.train --output``), a
trial's Ray Train directory (``<storage>/trials/<sweep>-<trial>``: its best kept checkpoint), a
sweep's trial directory (``<storage>/<sweep>/<trial>``: that trial's best checkpoint) or a
sweep's directory (``<storage>/<sweep>``: the best checkpoint of its top trial), or the URI of a
checkpoint in remote storage (``s3://...``, as the sweep's closing summary prints it).

OUT (new or empty) gets, without ``--adapter``: ``config.json``, ``generation_config.json``, the
tokenizer and ``model*.safetensors`` shards (bfloat16 unless ``--dtype float32``), which
``AutoModelForCausalLM.from_pretrained``, lm-eval (``--model hf``) and vLLM load; with
``--adapter``: a peft LoRA adapter whose product is the whole update relative to the base model
(every unloaded stage and the live adapter, stacked: ``PeftModel.from_pretrained(base, OUT)``),
the unload ledger (``ledger/``) and the tokenizer. Everything is written beside OUT first and
moved into place when complete. ``--push-to-hub REPO`` then uploads OUT (needs a Hugging Face
token: ``HF_TOKEN`` or ``hf auth login``). Bad input: one ``error:`` line, exit status 2,
before any work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

from plora_ray.config.schema import ConfigError


class UsageError(Exception):
    """Bad command-line input; the message is the one line shown to the user."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m plora_ray.export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="checkpoint, run output, trial or sweep directory, or a checkpoint's URI")
    p.add_argument("out", metavar="OUT", help="the folder to write (new or empty)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="weights dtype of the merged model (default: bfloat16)")
    p.add_argument("--adapter", action="store_true",
                   help="write a peft adapter relative to the base model and the unload ledger instead")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload OUT to this Hugging Face model repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    return p.parse_args(argv)


def check_push(repo: str) -> None:
    """``--push-to-hub``: a repo id, the hub reachable in principle, a token configured."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise UsageError(f"--push-to-hub {repo!r} is not a repo id: give NAME or OWNER/NAME") from None
    if constants.HF_HUB_OFFLINE:
        raise UsageError("--push-to-hub: the Hugging Face hub is switched off here (HF_HUB_OFFLINE is set): "
                         "unset it to upload, or drop --push-to-hub")
    if not get_token():
        raise UsageError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`, "
                         "or drop --push-to-hub")


def check_shard_size(size: str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        ok = convert_file_size_to_int(size) > 0
    except ValueError:
        ok = False
    if not ok:
        raise UsageError(f"--max-shard-size {size!r} is not a size: give a number and a unit, e.g. 5GB or 500MB")


def check_out(out: str) -> Path:
    from plora_ray.sweep.preflight import check_writable

    path = Path(out).expanduser().absolute()
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"OUT '{path}' is not empty: name a new or empty directory (nothing is overwritten)")
    try:
        check_writable(path, "OUT")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return path


def _last_row(trial_dir: Path) -> dict:
    """The last result Tune recorded for a trial (its ``result.json``: one JSON line a report)."""
    last = {}
    try:
        for line in (trial_dir / "result.json").read_text().splitlines():
            if line.strip():
                last = json.loads(line)
    except (OSError, ValueError):
        return {}
    return last


def _trial_checkpoint(trial_dir: Path, row: dict) -> Path | None:
    """A sweep trial's best checkpoint: the one its function reported, else (a trial stopped
    early) the best its Train run kept (``<storage>/trials/<sweep>-<trial id>``)."""
    from plora_ray.sweep.tune import trial_best_checkpoint

    path = row.get("best_checkpoint_path") or trial_best_checkpoint(
        str(trial_dir.parent.parent), trial_dir.parent.name, row.get("trial_id") or trial_dir.name)
    return Path(path) if path else None


def _top_trial(sweep_dir: Path) -> tuple[Path, dict] | None:
    """The trial of a Tune experiment directory with the best last value of the sweep's metric
    (as the sweep's closing summary picks it); None if no trial row names the metric."""
    rows = {d: _last_row(d) for d in sorted(sweep_dir.iterdir()) if (d / "result.json").is_file()}
    named = [r for r in rows.values() if r.get("sweep_metric")]
    if not named:
        return None
    metric, mode = named[0]["sweep_metric"], named[0].get("sweep_mode", "min")
    scored = [(r[metric], d, r) for d, r in rows.items()
              if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not scored:
        return None
    _, d, r = (min if mode == "min" else max)(scored, key=lambda x: x[0])
    return d, r


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint directory ``path`` names (see the module's doc), or UsageError."""
    from plora_ray.ray.trainer import kept_checkpoints
    from plora_ray.run.rundir import MERGED, checkpoint_dir

    if not path.exists():
        raise UsageError(f"CHECKPOINT '{path}' does not exist: give a checkpoint, run output or sweep directory")
    found = checkpoint_dir(path)
    if found is None and path.is_dir():
        best, _ = kept_checkpoints(path)  # a Ray Train run's directory
        if best is None and (path / "result.json").is_file():  # a Tune trial's directory
            best = _trial_checkpoint(path, _last_row(path))
        elif best is None and (top := _top_trial(path)) is not None:  # a Tune experiment's directory
            best = _trial_checkpoint(*top)
        found = checkpoint_dir(best) if best is not None else None
        if best is not None and found is None:
            raise UsageError(f"CHECKPOINT '{path}' names the checkpoint '{best}', which is not on this "
                             "machine: give its path or URI")
    if found is None:
        folder = next((d for d in (path, path / MERGED) if (d / "config.json").is_file()), None)
        hint = f" ({folder} already is a Hugging Face model folder)" if folder else ""
        raise UsageError(f"CHECKPOINT '{path}' is not a checkpoint{hint}: give a directory with state.json, "
                         "a run's output directory, or a sweep's trial directory")
    return found


def fetch_remote(uri: str, dst: Path) -> Path:
    """A checkpoint in remote storage (``s3://``, ``gs://``, ``file://``), copied to ``dst``."""
    import pyarrow.fs

    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(uri)
        kind = fs.get_file_info(inner).type
    except (OSError, ValueError) as exc:
        raise UsageError(f"CHECKPOINT '{uri}' cannot be read ({str(exc).strip().splitlines()[0]}): check the URI "
                         "and the storage's credentials") from None
    if kind != pyarrow.fs.FileType.Directory:
        raise UsageError(f"CHECKPOINT '{uri}' does not exist: give a checkpoint directory's URI")
    pyarrow.fs.copy_files(inner, str(dst), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    return dst


def check_source(ckpt: Path, args: argparse.Namespace) -> None:
    """The checkpoint's config, base model and (``--adapter``) kind, before the model is built."""
    from plora_ray.run.export import check_adapter_export
    from plora_ray.run.rundir import checkpoint_config
    from plora_ray.sweep.preflight import check_model

    cfg = checkpoint_config(ckpt)
    if args.adapter:
        check_adapter_export(cfg, ckpt)
    check_model(cfg)


def write(ckpt: Path, out: Path, args: argparse.Namespace, source: str | None = None) -> str:
    """Export into a folder beside ``out``, moved to ``out`` once complete; what was written.
    ``source``: the checkpoint's URI where ``ckpt`` is its downloaded copy."""
    from plora_ray.run.export import export_adapter, export_merged

    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        if args.adapter:
            export_adapter(ckpt, partial, source)
            what = "adapter (relative to the base model) and unload ledger"
            hint = f"PeftModel.from_pretrained(base_model, '{out}')"
        else:
            export_merged(ckpt, partial, args.dtype, args.max_shard_size, source)
            shards = len(list(partial.glob("*.safetensors")))
            what = f"merged model ({args.dtype}, {shards} safetensors shard{'s' * (shards != 1)})"
            hint = f"AutoModelForCausalLM.from_pretrained('{out}')"
        if out.is_dir():
            out.rmdir()  # empty (checked before): the complete export takes its place
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return f"exported {what} of {source or ckpt} to {out}; load it: {hint}"


def push(out: Path, repo: str, private: bool) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=str(out), commit_message="Upload model exported by plora-ray")
    return f"pushed to {url}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    download = None
    try:
        if args.push_to_hub:
            check_push(args.push_to_hub)
        check_shard_size(args.max_shard_size)
        out = check_out(args.out)
        if "://" in args.checkpoint:  # remote storage: copied beside OUT, then as a local one
            download = out.with_name(f".{out.name}.download-{os.getpid()}")
            ckpt = resolve_checkpoint(fetch_remote(args.checkpoint, download))
        else:
            ckpt = resolve_checkpoint(Path(args.checkpoint).expanduser().absolute())
        if out == ckpt or ckpt in out.parents:
            raise UsageError(f"OUT '{out}' is inside the checkpoint '{ckpt}': write the export elsewhere")
        check_source(ckpt, args)
        print(write(ckpt, out, args, args.checkpoint if download is not None else None))
    except (UsageError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # while writing (a full disk): nothing half-written is left at OUT
        print(f"error: export failed ({exc}); nothing was written to {args.out}", file=sys.stderr)
        return 1
    finally:
        if download is not None:
            shutil.rmtree(download, ignore_errors=True)
    if args.push_to_hub:
        try:
            print(push(out, args.push_to_hub, args.private))
        except Exception as exc:  # network, permissions: the export itself is kept
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"error: upload to {args.push_to_hub} failed ({first}); the export is kept in {out}: "
                  f"retry with `hf upload {args.push_to_hub} {out}`", file=sys.stderr)
            return 1
    return 0
