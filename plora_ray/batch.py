"""``python -m plora_ray.batch``: see :mod:`plora_ray.sweep.batch`."""

import sys

from plora_ray.sweep.batch import main

if __name__ == "__main__":
    sys.exit(main())
