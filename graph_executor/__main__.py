"""`python -m graph_executor`: the executor process (its command line names it, for `ps`)."""

import sys

from ipc.parent_death import exit_with_parent

exit_with_parent()  # first: a supervisor dying while we import must not leave us behind

from ipc import cuda_context  # noqa: E402

cuda_context.start(cuda_context.argv_value(sys.argv[1:], "--device", "auto"))  # meanwhile: torch's seconds of import

from graph_executor.process import main  # noqa: E402

sys.exit(main())
