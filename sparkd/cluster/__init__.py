"""More than one box: worker leases between sparkd daemons for models that span several nodes.

Each node's sparkd alone decides what runs on its GPU.  A multi-node model is
owned by one sparkd (the head), which asks each peer's sparkd for a *worker
lease*; the peer admits it through its own scheduler, runs the Ray worker
container through its own Podman, and keeps it only while heartbeats arrive.
"""
