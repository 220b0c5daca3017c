"""`python -m noclone ...`: the `noclone` command, as `accelerate launch -m noclone ...` starts it in each process."""

import sys

from noclone.training.distributed import init_if_launched

# before any model is placed: under a launcher each process takes its own GPU, so 'auto'/'cuda' then mean that GPU
init_if_launched()

from noclone.cli import main  # noqa: E402

sys.exit(main())
