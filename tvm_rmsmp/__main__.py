"""``python -m tvm_rmsmp``: the command line."""

import sys

from tvm_rmsmp.cli.main import main

sys.exit(main())
