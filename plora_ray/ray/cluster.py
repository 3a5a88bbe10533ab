"""Where a sweep runs: the Ray cluster it connects to, its storage, and a tracking store every
node reaches.

* The address: ``--address`` (``auto``, ``HOST:PORT``, ``ray://HOST:10001``), else ``RAY_ADDRESS``
  (set by Ray for a Ray Job's entrypoint: ``ray job submit -- python -m plora_ray.tune ...``
  connects to the cluster the job runs on), else a local cluster started by the tool.
* The storage: a local path (made absolute; on a multi-node cluster a path every node mounts)
  or a URI Ray's ``storage_path`` takes (``s3://``, ``gs://``, ...), written through pyarrow's
  filesystems as Ray writes it.
* The tracking store: an MLflow server (``http(s)://``, ``databricks``...) on a multi-node cluster;
  a SQLite file or a local directory only on one machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from plora_ray.config.schema import ConfigError

LOCAL_TRACKING_SCHEMES = ("sqlite", "file")  # a store on one machine's disk


def is_uri(path: str | os.PathLike) -> bool:
    """``s3://bucket/x``, ``gs://...``, ``file:///...``: not a plain local path."""
    return "://" in str(path)


def storage_root(storage: str | os.PathLike) -> str:
    """The storage as Ray gets it: an absolute local path (every node resolves the same one),
    or the URI as given (without a trailing slash)."""
    if is_uri(storage):
        return str(storage).rstrip("/")
    return str(Path(storage).expanduser().resolve())


def storage_join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if is_uri(root) else str(Path(root, *parts))


def _fs(path: str):
    import pyarrow.fs  # what Ray's storage layer uses for the same URIs

    return pyarrow.fs.FileSystem.from_uri(path)


def read_text(path: str) -> str | None:
    """The text at a local path or a URI; None if there is no such file."""
    if not is_uri(path):
        p = Path(path)
        return p.read_text() if p.is_file() else None
    import pyarrow.fs

    fs, inner = _fs(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        return
    fs, inner = _fs(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def cluster_address(address: str | None) -> str | None:
    """``--address``, else the cluster of the Ray Job this process runs in (``RAY_ADDRESS``)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def alive_nodes() -> list[dict]:
    """The alive nodes of the cluster this process is connected to."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def is_local_tracking(uri: str) -> bool:
    """A SQLite file or a directory (``sqlite:``, ``file:``, a plain path): one machine's disk.
    Servers (``http(s)://``) and Databricks (``databricks``, ``databricks-uc``) are not."""
    if "://" in uri:
        return uri.split("://", 1)[0].lower() in LOCAL_TRACKING_SCHEMES
    return not uri.lower().startswith("databricks")


def check_tracking_for_cluster(uri: str, nodes: int) -> None:
    """On a cluster of more than one node every trial's rank 0 may run on any node: the MLflow
    store must be a server they all reach. ConfigError (one line) for SQLite / a local directory."""
    if nodes > 1 and is_local_tracking(uri):
        raise ConfigError(f"--tracking-uri: '{uri}' is a store on one machine's disk and this Ray cluster has "
                          f"{nodes} nodes, whose trials log from any of them: start an MLflow server "
                          "(mlflow server --host HOST --port 5000 --backend-store-uri ...) and give "
                          "--tracking-uri http://HOST:5000")
