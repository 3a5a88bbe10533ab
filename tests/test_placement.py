"""A placement group left CREATED with every actor in it dead (what Ray Train leaves when Tune
stops a trial) is released; one in use, or one no actor was scheduled into yet, is kept."""

import time

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from plora_ray.placement import release_orphaned_placement_groups


@ray.remote(num_cpus=1)
class Holder:
    def ping(self):
        return 1


def state(pg):
    return placement_group_table(pg)["state"]


@pytest.mark.timeout(300)
def test_only_placement_groups_whose_actors_all_died_are_released():
    ray.init(num_cpus=3, include_dashboard=True, log_to_driver=False)
    try:
        orphan, used, fresh = (placement_group([{"CPU": 1}]) for _ in range(3))
        ray.get([pg.ready() for pg in (orphan, used, fresh)])
        strategy = lambda pg: PlacementGroupSchedulingStrategy(placement_group=pg)  # noqa: E731
        dead = Holder.options(scheduling_strategy=strategy(orphan)).remote()
        alive = Holder.options(scheduling_strategy=strategy(used)).remote()
        assert ray.get([dead.ping.remote(), alive.ping.remote()]) == [1, 1]
        ray.kill(dead)
        removed = []
        for _ in range(60):  # the state API sees the death within a few seconds
            removed += release_orphaned_placement_groups()
            if removed:
                break
            time.sleep(1)
        assert removed == [orphan.id.hex()]
        assert state(orphan) == "REMOVED" and state(used) == "CREATED" and state(fresh) == "CREATED"
        # its CPU is free again: a new group of the same size gets placed
        ray.get(placement_group([{"CPU": 1}]).ready(), timeout=60)
    finally:
        ray.shutdown()
