"""``python -m plora_ray.batch``: see :mod:`plora_ray.cli.batch`."""

import sys

from plora_ray.cli.batch import main

if __name__ == "__main__":
    sys.exit(main())
