"""``python -m plora_ray.tune``: see :mod:`plora_ray.sweep.tune`."""

import sys

from plora_ray.sweep.tune import main

if __name__ == "__main__":
    sys.exit(main())
