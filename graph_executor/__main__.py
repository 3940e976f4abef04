"""`python -m graph_executor`: the executor process (its command line names it, for `ps`)."""

import sys

from graph_executor.process import main

sys.exit(main())
