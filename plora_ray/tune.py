"""``python -m plora_ray.tune``: see :mod:`plora_ray.cli.tune`."""

import sys

from plora_ray.cli.tune import main

if __name__ == "__main__":
    sys.exit(main())
