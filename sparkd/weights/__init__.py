"""Model weights as a step of their own: the files vLLM loads, pulled from the hub into the cache
a model's container mounts, checked for presence and for disk space before a download starts."""
