"""Cluster batch runs: many sweeps queued on a Ray cluster as Ray Jobs.

    python -m plora_ray.batch submit search_spaces/batches/paper.yaml [--address http://HEAD:8265]
    python -m plora_ray.batch status search_spaces/batches/paper.yaml
    python -m plora_ray.batch logs   search_spaces/batches/paper.yaml unload [--follow]
    python -m plora_ray.batch stop   search_spaces/batches/paper.yaml [unload | JOB_ID ...]

argparse -> exit codes only: the batch file, validation, submission and the job records are
:mod:`plora_ray.sweep.batch`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from plora_ray.config.schema import ConfigError
from plora_ray.assets.dialogues import DataError
from plora_ray.sweep.batch import (DEFAULT_ADDRESS, META_SWEEP, TERMINAL, WAIT_POLL_S, batch_jobs, client_for,
                                   follow_logs, job_address, job_status, load_batch, pick_jobs, status_table,
                                   submit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m plora_ray.batch", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["submit", "status", "logs", "stop"])
    parser.add_argument("file", help="batch file (see search_spaces/batches/)")
    parser.add_argument("targets", nargs="*", help="logs / stop: sweep names or job ids (default: all)")
    parser.add_argument("--address", help="Ray Jobs address, http://HEAD:8265 (default: the batch file's, "
                        f"$RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, {DEFAULT_ADDRESS})")
    parser.add_argument("--state-dir", default="runs/batches", help="where job ids are recorded per batch")
    parser.add_argument("--no-path-checks", action="store_true",
                        help="submit: skip checks of model, data and storage paths that exist only on the cluster")
    parser.add_argument("--dry-run", action="store_true", help="submit: validate and print the jobs, submit none")
    parser.add_argument("--storage", help="submit: the --storage of every sweep, instead of the file's")
    parser.add_argument("--tracking-uri", help="submit: the --tracking-uri of every sweep, instead of the file's")
    parser.add_argument("--follow", action="store_true", help="logs: follow one job's log until it ends")
    parser.add_argument("--wait", action="store_true", help="status: wait until every job of the batch has "
                        "ended; exit 1 unless all succeeded")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    state_dir = Path(args.state_dir)
    try:
        batch = load_batch(args.file, check_paths=not (args.no_path_checks or args.command != "submit"),
                           storage=args.storage, tracking_uri=args.tracking_uri)
        if args.command == "submit" and args.dry_run:
            for name, space, sweep in batch.sweeps:
                print(f"{name}: {batch.entrypoint(space, sweep)}")
            return 0
        client = client_for(job_address(args.address, batch))
        if args.command == "submit":
            for name, job_id in submit(batch, client, state_dir):
                print(f"submitted {name}: {job_id}")
            print(f"status: python -m plora_ray.batch status {args.file}")
            return 0
        jobs = batch_jobs(batch, client, state_dir)
        if args.command == "status":
            while args.wait and any(job_status(h[-1]) not in TERMINAL for h in jobs.values() if h):
                time.sleep(WAIT_POLL_S)
                jobs = batch_jobs(batch, client, state_dir)
            print(status_table(jobs))
            return 0 if not args.wait or all(h and job_status(h[-1]) == "SUCCEEDED" for h in jobs.values()) else 1
        picked = pick_jobs(batch, jobs, args.targets)
        if args.command == "stop":
            for job in picked:
                stopped = client.stop_job(job.submission_id)
                print(f"{'stopping' if stopped else 'already ended'}: {(job.metadata or {}).get(META_SWEEP, '?')} "
                      f"{job.submission_id}")
            return 0
        if args.follow:
            if len(picked) != 1:
                raise ConfigError("logs --follow: name one sweep or job id")
            follow_logs(client, picked[0].submission_id)
            return 0
        for job in picked:
            print(f"==> {(job.metadata or {}).get(META_SWEEP, '?')} {job.submission_id} ({job_status(job)}) <==")
            print(client.get_job_logs(job.submission_id), end="")
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
