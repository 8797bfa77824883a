"""`python -m shitu` (and `torchrun -m shitu`) run the command-line interface."""

import sys

from shitu.cli.main import main

sys.exit(main())
