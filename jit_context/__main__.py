"""`python -m jit_context`: the JIT context process (its command line names it, for `ps`)."""

import sys

from ipc.parent_death import exit_with_parent

exit_with_parent()  # first: a supervisor dying while we import must not leave us behind

from ipc import cuda_context  # noqa: E402

# The GPU the executor will use (the launcher passes it only for a GPU run): its context, while torch imports.
cuda_context.start(cuda_context.argv_value(sys.argv[1:], "--cuda-device", "cpu"))

from jit_context.process import main  # noqa: E402

sys.exit(main())
