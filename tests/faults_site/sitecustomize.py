"""Run by every Python process whose PYTHONPATH names this folder (the nodes of
tests/multinode.py): installs ``$PLORA_TEST_STEP_FAULT``, see tests/faults.py."""

import os

if os.environ.get("PLORA_TEST_STEP_FAULT"):
    import faults  # tests/ is on the same PYTHONPATH

    faults.install_from_env()
