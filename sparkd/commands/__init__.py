"""``sparkd`` subcommands besides ``serve``: operator tools that run and exit."""
