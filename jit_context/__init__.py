"""The process that owns requests: tokenizer, sampling, stop handling, detokenization, client sockets."""

# The supervisor hands the server's --api-key to the JIT context process in the environment (never on the command
# line, which `ps` shows); a client's own $HYBRIDRT_API_KEY is another variable, so a user's shell never turns it on.
SERVER_API_KEY_ENV = "HYBRIDRT_SERVER_API_KEY"
