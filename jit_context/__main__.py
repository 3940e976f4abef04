"""`python -m jit_context`: the JIT context process (its command line names it, for `ps`)."""

import sys

from jit_context.process import main

sys.exit(main())
