"""python -m tools: the command line of ppdeploy (tools/commands.py)."""

import sys

from tools.commands import main

sys.exit(main())
