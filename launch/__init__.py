"""The CLI, the process supervisor and the client library."""

# The key a server started with --api-key wants, for clients (here, not in launch.client, so that the CLI reads it
# without importing ZeroMQ before it has started the server's processes).
API_KEY_ENV = "HYBRIDRT_API_KEY"
