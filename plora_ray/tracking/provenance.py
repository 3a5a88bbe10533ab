"""Where a sweep's code came from: the git commit of the checkout and the installed versions of
the stack (tagged on the sweep's run by ``driver.start_sweep_run``). Subprocess and package
metadata only: nothing is imported."""

from __future__ import annotations

import subprocess
from pathlib import Path

VERSIONED_PACKAGES = ("ray", "peft", "torch", "transformers", "deepspeed", "mlflow", "plora-ray")


def git_commit(path: str | Path | None = None) -> tuple[str, bool | None]:
    """(commit, dirty) of the git checkout holding ``path`` (default: this package's source,
    then the working directory); ``("unknown", None)`` outside a git repository."""
    for where in ([Path(path)] if path is not None else [Path(__file__).resolve().parent, Path.cwd()]):
        where = where if where.is_dir() else where.parent
        git = ["git", "-C", str(where)]
        try:
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            if commit.returncode != 0:
                continue
            status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown", None


def package_versions() -> dict[str, str]:
    """Installed versions of the stack (from package metadata: nothing is imported)."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


__all__ = ["VERSIONED_PACKAGES", "git_commit", "package_versions"]
