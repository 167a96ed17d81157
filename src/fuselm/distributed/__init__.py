"""The rank runtime: launch, monitor, worker, pipeline links, step plans, distributed executor."""
