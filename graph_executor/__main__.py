"""`python -m graph_executor`: the executor process (its command line names it, for `ps`)."""

import sys

from ipc.parent_death import exit_with_parent

exit_with_parent()  # first: a supervisor dying while we import must not leave us behind

from ipc import cuda_context  # noqa: E402

# meanwhile: torch's seconds of import
if cuda_context.start(cuda_context.argv_value(sys.argv[1:], "--device", "auto")) is not None \
        and "--no-graphs" not in sys.argv[1:] and cuda_context.gpu_visible():
    from graph_executor import triton_prefetch

    triton_prefetch.start()  # Triton's own hashing and imports, off the first graph's warm-up

from graph_executor.process import main  # noqa: E402

sys.exit(main())
