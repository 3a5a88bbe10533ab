"""Release placement groups that Ray Train left behind when Tune stopped a trial.

When a scheduler (ASHA) stops a trial, Tune kills the trial's actor and with it the trial's Train
controller; with Ray 2.60 the worker group's placement group then sometimes stays CREATED with
every actor in it dead, reserving its CPUs/GPUs for good. On a small cluster the next trials'
worker groups then wait for resources forever (seen on 2 cores: 3 of 3 CPUs reserved, 0 used,
one placement group PENDING). The sweep's driver runs :class:`OrphanedPlacementGroups` as a Tune
callback: every few seconds it removes the placement groups whose actors have all died. A
placement group no actor was ever scheduled into (one being set up) is left alone; Ray Train
removes a failed worker group's placement group itself and starts the next in a new one.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict

from ray.tune import Callback


def release_orphaned_placement_groups() -> list[str]:
    """Remove every CREATED placement group whose actors are all dead; returns their ids."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup
    from ray.util.state import list_actors, list_placement_groups

    address = ray.get_runtime_context().gcs_address  # this driver's cluster, not another on the host
    states = defaultdict(list)
    for actor in list_actors(address=address, detail=True, limit=10_000, raise_on_missing_output=False):
        if actor.placement_group_id:
            states[actor.placement_group_id].append(actor.state)
    removed = []
    for pg in list_placement_groups(address=address, detail=True, limit=10_000, raise_on_missing_output=False):
        seen = states.get(pg.placement_group_id)
        if pg.state == "CREATED" and seen and all(s == "DEAD" for s in seen):
            ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg.placement_group_id)))
            removed.append(pg.placement_group_id)
    return removed


class OrphanedPlacementGroups(Callback):
    """Tune callback: :func:`release_orphaned_placement_groups` every ``every_s`` seconds and
    after every trial that ends (a failure of the state API only skips a round)."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self._last = 0.0
        self.removed: list[str] = []
        self._warned = False

    def _release(self) -> None:
        self._last = time.monotonic()
        try:
            self.removed += release_orphaned_placement_groups()
        except Exception as exc:  # noqa: BLE001 - the state API is best effort; the next round retries
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
