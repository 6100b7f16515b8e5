"""`python -m llmrec.cli ...`: the same as the `llmrec` command (bench/serve_load.py starts the server this way)."""

import sys

from .runner import main

sys.exit(main())
