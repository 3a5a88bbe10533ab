"""What the sweep's driver hands every trial: the sweep's names and places, fixed when it starts.

Written as ``<storage>/<sweep>.latest.json`` (``--resume`` reads it back) and passed to each
trial's function (``tune.with_parameters(trial_function, sweep=...)``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class SweepContext:
    name: str  # the sweep's run name: <spec name>-<start time>; Tune's experiment name
    storage: str  # Ray storage root (a local path, s3://..., gs://...)
    tracking_uri: str  # MLflow
    experiment_id: str  # MLflow experiment of the sweep file
    parent_run_id: str  # MLflow run of the sweep; the trials' runs are nested in it
    # the search-space file as the driver validated it (SweepSpec.model_dump(mode="json")); each
    # trial validates it again, so its errors name the trial as before
    spec: dict

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "storage": self.storage, "tracking_uri": self.tracking_uri,
                           "experiment_id": self.experiment_id, "parent_run_id": self.parent_run_id,
                           "spec": self.spec})

    @classmethod
    def from_json(cls, text: str) -> SweepContext:
        d = json.loads(text)
        return cls(d["name"], d["storage"], d["tracking_uri"], d["experiment_id"], d["parent_run_id"], d["spec"])
