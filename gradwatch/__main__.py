"""Entry point for ``python -m gradwatch`` (same as the ``gradwatch`` command)."""

import sys

from .cli import main

sys.exit(main())
