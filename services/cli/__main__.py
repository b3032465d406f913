"""`python -m services.cli ...` is the `rpo` command (child processes start it this way)."""

import sys

from services.cli.main import main

sys.exit(main())
