"""The CLI, the process supervisor and the client library."""
