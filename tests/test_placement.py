"""A placement group left CREATED with every actor in it dead (what Ray Train leaves when Tune
stops a trial) is released; one in use, or one no actor was scheduled into yet, is kept."""

import time

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from plora_ray.ray.placement import release_orphaned_placement_groups


@ray.remote(num_cpus=1)
class Holder:
    def ping(self):
        return 1


def state(pg):
    return placement_group_table(pg)["state"]


@pytest.mark.timeout(300)
def test_only_placement_groups_whose_actors_all_died_are_released():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # GCS tables only
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


def test_the_lifetime_rule_frees_only_groups_whose_job_and_creator_have_died():
    from plora_ray.ray.placement import NIL_ACTOR, leaked

    def pg(**kw):
        return {"state": "CREATED", "detached": False, "job_dead": False, "actor_dead": False,
                "creator_job": "0b000000", "creator_actor": "a" * 32, **kw}

    dead_jobs, actors = {"0b000000"}, {"a" * 32: "DEAD"}
    assert leaked(pg(), dead_jobs, actors)  # GCS's flags stale: the tables say both died
    assert leaked(pg(job_dead=True, actor_dead=True), set(), {})
    assert leaked(pg(creator_actor=NIL_ACTOR), dead_jobs, {})  # made by a driver that died
    assert not leaked(pg(), set(), actors)  # its job lives
    assert not leaked(pg(), dead_jobs, {"a" * 32: "ALIVE"})  # a live (detached) creator actor owns it
    assert not leaked(pg(), dead_jobs, {})  # a creator the actor table does not show: kept
    assert not leaked(pg(detached=True, job_dead=True, actor_dead=True), dead_jobs, actors)
    assert not leaked(pg(state="PENDING", job_dead=True, actor_dead=True), dead_jobs, actors)


DETACHED_OWNER = """
import ray, sys
from ray.util.placement_group import placement_group
ray.init(address=sys.argv[1], namespace="leak-test", log_to_driver=False)

@ray.remote(num_cpus=0)
class Owner:
    def make(self):
        self.pg = placement_group([{"CPU": 1}])
        ray.get(self.pg.ready())
        return self.pg.id.hex()

owner = Owner.options(name="owner", lifetime="detached").remote()
print(ray.get(owner.make.remote()))
"""


@pytest.mark.timeout(300)
def test_groups_of_live_jobs_detached_groups_and_groups_of_live_detached_actors_are_kept(tmp_path):
    import subprocess
    import sys

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # GCS tables only
    try:
        mine = placement_group([{"CPU": 1}])  # this (live) driver's
        kept = placement_group([{"CPU": 1}], lifetime="detached")
        ray.get([mine.ready(), kept.ready()])
        script = tmp_path / "owner.py"
        script.write_text(DETACHED_OWNER)
        # a driver that makes a detached actor, which makes a group, and exits: the group's job
        # is dead, its creator lives
        done = subprocess.run([sys.executable, str(script), ray.get_runtime_context().gcs_address],
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        owned = done.stdout.split()[-1]
        from plora_ray.ray.placement import placement_groups

        [group] = [g for g in placement_groups() if g["id"] == owned]
        assert group["state"] == "CREATED" and not group["detached"]
        assert release_orphaned_placement_groups() == []
        assert state(mine) == "CREATED" and state(kept) == "CREATED"
        assert placement_group_table()[owned]["state"] == "CREATED"
        ray.kill(ray.get_actor("owner", namespace="leak-test"))  # its creator dies too: Ray removes it (the rule's other half)
        for _ in range(60):
            if placement_group_table()[owned]["state"] == "REMOVED":
                break
            time.sleep(1)
        assert placement_group_table()[owned]["state"] == "REMOVED"
    finally:
        ray.shutdown()
