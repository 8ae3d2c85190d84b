"""Facts about this host's hardware, probed: how much GPU memory is free, which GPU devices a container can get."""
