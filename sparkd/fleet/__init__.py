"""A fleet of Sparks behind one endpoint: a request to any sparkd for a model another node runs (or
should run) is forwarded to that node's sparkd over the peer channel, where its own fixups and lease apply.

``nodes.py`` says which nodes may run a model, ``placement.py`` ranks them (pure), ``peerwatch.py``
keeps what each peer serves, ``onbehalf.py`` is who a forwarded request is for, ``relay.py`` sends
one to a peer, and ``coordinator.py`` ties them to this node's scheduler.
"""
