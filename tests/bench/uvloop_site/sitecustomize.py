"""Put on PYTHONPATH by run.py --uvloop: the sparkd process under test runs its asyncio code on uvloop.

An experiment for the benchmarks only (sparkd itself does not use uvloop): it shows how much of
sparkd's CPU per request/chunk is the event loop's.
"""

import uvloop

uvloop.install()
