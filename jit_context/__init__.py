"""The process that owns requests: tokenizer, sampling, stop handling, detokenization, client sockets."""

# The supervisor hands the server's --api-key to the JIT context process in the environment (never on the command
# line, which `ps` shows); a client's own $HYBRIDRT_API_KEY is another variable, so a user's shell never turns it on.
SERVER_API_KEY_ENV = "HYBRIDRT_SERVER_API_KEY"

# How long a JIT context waits for its executor to answer one step before failing the request (a hung executor):
# generous, for a long CPU prefill; a GPU step is only enqueued (well under 1 ms). Here, not in remote_executor.py,
# so that the launcher reads it without importing torch.
DEFAULT_STEP_TIMEOUT_S = 60.0
