"""The run machinery: the controller, each node's remote job, the stream, the run records, restarts, preflight."""
