"""``python -m cascade_bench ...`` (and ``torchrun ... -m cascade_bench run ...``): the ``cascade-bench`` CLI."""

import sys

from .cli import main

sys.exit(main())
