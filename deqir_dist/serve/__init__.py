"""deqir serve: the engine (queue, batching, deadlines), executors (in-process, a local gang) and the ASGI app."""
