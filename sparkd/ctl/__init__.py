"""``sparkctl``: the operator's command line for a running sparkd (status, logs, prepare, history...)."""
