"""``python -m plora_ray.evaluate``: see :mod:`plora_ray.cli.evaluate`."""

import sys

from plora_ray.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
