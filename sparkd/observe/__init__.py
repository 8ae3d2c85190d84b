"""What watches the daemon: Prometheus metrics (``metrics``), the usage history in SQLite
(``history``), and the live status hub with the wiring that feeds them all the scheduler's
events, their background loops and the admin socket (``operations``)."""
