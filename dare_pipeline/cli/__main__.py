"""`python -m dare_pipeline.cli`: the `dare-pipeline` command."""

import sys

from .commands import main

sys.exit(main())
