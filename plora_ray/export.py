"""``python -m plora_ray.export``: see :mod:`plora_ray.cli.export`."""

import sys

from plora_ray.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
