"""The engine: requests, paged KV blocks, scheduling, the model runner, sync and async faces."""
