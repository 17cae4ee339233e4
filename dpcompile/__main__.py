"""`python -m dpcompile ...` is the `dpcompile` command."""
import sys

from .cli import main

sys.exit(main())
