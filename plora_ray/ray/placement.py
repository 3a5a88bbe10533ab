"""Release placement groups that Ray Train left behind when Tune stopped a trial.

When a scheduler (ASHA) stops a trial, Tune kills the trial's actor and with it the trial's Train
controller; with Ray 2.60 the worker group's placement group then sometimes stays CREATED with
every actor in it dead, reserving its CPUs/GPUs for good. On a small cluster the next trials'
worker groups then wait for resources forever (seen on 2 cores: 3 of 3 CPUs reserved, 0 used,
one placement group PENDING). The sweep's driver runs :class:`OrphanedPlacementGroups` as a Tune
callback: every few seconds it removes the placement groups whose actors have all died. A
placement group no actor was ever scheduled into (one being set up) is left alone; Ray Train
removes a failed worker group's placement group itself and starts the next in a new one.

A placement group also outlives a driver that was killed (``ray job stop`` sends SIGKILL 3 s
after SIGTERM; a lost driver node): Ray removes a non-detached group when both its creator job
and creator actor have died, and Train's detached cleaner removes a dead controller's group,
but on a loaded cluster a Train worker group's group has stayed CREATED, with no actor and its
job dead, holding a CPU for good. :func:`leaked` applies Ray's own lifetime rule to what the
job and actor tables say, and every sweep releases such groups when it starts, while it runs
and when it ends. Nothing a live job, a live creator actor or a detached group owns is touched.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

from ray.tune import Callback


def placement_groups() -> list[dict]:
    """Every placement group GCS knows, with what decides its lifetime: the creator job and
    actor, whether each has died, whether it is detached (the state API leaves these out)."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    if not ray.is_initialized():
        raise RuntimeError("not connected to a Ray cluster")
    names = gcs_pb2.PlacementGroupTableData.PlacementGroupState.Name
    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        out.append({"id": pg.placement_group_id.hex(), "state": names(pg.state),
                    "creator_job": pg.creator_job_id.hex(), "creator_actor": pg.creator_actor_id.hex(),
                    "job_dead": pg.creator_job_dead, "actor_dead": pg.creator_actor_dead, "detached": pg.is_detached,
                    "bundles": [dict(b.unit_resources) for b in pg.bundles]})
    return out


NIL_ACTOR = "f" * 32  # the creator of a group a driver made
NIL_PG = "f" * 36  # an actor outside any group


def leaked(pg: dict, dead_jobs: set[str], actor_states: dict[str, str]) -> bool:
    """Ray's lifetime rule for a non-detached placement group (it ends when its creator job and
    its creator actor have both died), on the job and actor tables rather than only on the
    flags GCS keeps on the group: a CREATED group past its lifetime holds resources for good."""
    if pg["state"] != "CREATED" or pg["detached"]:
        return False
    job_dead = pg["job_dead"] or pg["creator_job"] in dead_jobs
    actor = pg["creator_actor"]
    actor_dead = pg["actor_dead"] or actor == NIL_ACTOR or actor_states.get(actor) == "DEAD"
    return job_dead and actor_dead


def actor_table() -> list:
    """Every actor GCS knows, as its ``ActorTableData`` records, read from its actor table (no
    dashboard or state API needed)."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    if not ray.is_initialized():
        raise RuntimeError("not connected to a Ray cluster")
    return [gcs_pb2.ActorTableData.FromString(raw)
            for raw in state._connect_and_get_accessor().get_actor_table(None, None)]


def actors() -> dict[str, tuple[str, str]]:
    """``{actor id: (state, placement group id or "")}`` for every actor GCS knows."""
    from ray.core.generated import gcs_pb2

    names = gcs_pb2.ActorTableData.ActorState.Name
    out = {}
    for a in actor_table():
        pg = a.placement_group_id.hex()
        out[a.actor_id.hex()] = (names(a.state), "" if pg in ("", NIL_PG) else pg)
    return out


def release_orphaned_placement_groups() -> list[str]:
    """Remove every CREATED placement group whose actors are all dead, or that is
    :func:`leaked` (its job and creator gone); returns their ids."""
    import ray
    from ray._private.state import state
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    states, actor_states = defaultdict(list), {}
    for actor_id, (actor_state, pg_id) in actors().items():
        actor_states[actor_id] = actor_state
        if pg_id:
            states[pg_id].append(actor_state)
    dead_jobs = {job["JobID"] for job in state.job_table() if job["IsDead"]}
    removed = []
    for pg in placement_groups():
        seen = states.get(pg["id"])
        orphan = pg["state"] == "CREATED" and seen and all(s == "DEAD" for s in seen)
        if orphan or leaked(pg, dead_jobs, actor_states):
            ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg["id"])))
            removed.append(pg["id"])
    return removed


def release_leaked(when: str) -> list[str]:
    """:func:`release_orphaned_placement_groups`, saying on stderr what it freed (``when``: at
    the start or the end of a sweep); a failure to read GCS is a warning."""
    try:
        removed = release_orphaned_placement_groups()
    except Exception as exc:  # noqa: BLE001 - best effort: the callback retries while the sweep runs
        print(f"warning: could not check for leaked placement groups ({exc})", file=sys.stderr)
        return []
    if removed:
        print(f"released {len(removed)} placement group(s) that ended jobs or trials left reserved ({when}): "
              f"{', '.join(removed)}", file=sys.stderr)
    return removed


class OrphanedPlacementGroups(Callback):
    """Tune callback: :func:`release_orphaned_placement_groups` every ``every_s`` seconds and
    after every trial that ends (a failure to read GCS only skips a round)."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self._last = 0.0
        self.removed: list[str] = []
        self._warned = False

    def _release(self) -> None:
        self._last = time.monotonic()
        try:
            self.removed += release_orphaned_placement_groups()
        except Exception as exc:  # noqa: BLE001 - GCS reads are best effort; the next round retries
            if not self._warned:
                print(f"warning: could not check for orphaned placement groups ({exc})", file=sys.stderr)
                self._warned = True

    def on_step(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.every_s:
            self._release()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release()
