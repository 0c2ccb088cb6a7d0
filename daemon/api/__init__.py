"""The HTTP face of the daemon: routes, request checks, SSE streams."""
