"""``python -m plora_ray.train``: see :mod:`plora_ray.cli.train`."""

import sys

from plora_ray.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
