"""Fleet drift and SLA views: rollups kept on ingest, queries over any group and range.

- :mod:`server.drift.models` -- the rollup tables (per device and fleet-wide, per hour
  and day), the layouts of their packed counts, the retention marks.
- :mod:`server.drift.layout` -- packing counts and moments (pure).
- :mod:`server.drift.rollups` -- adding newly ingested windows to the rollups.
- :mod:`server.drift.retention` -- deleting old raw telemetry and rollups.
- :mod:`server.drift.timerange` -- ranges, buckets, and which rows answer a range (pure).
- :mod:`server.drift.compute` -- the drift and SLA figures from summed counts (pure).
- :mod:`server.drift.storage` -- reading rollup rows for a plan.
- :mod:`server.drift.service` -- a query end to end: version, reference, group, plan.

Nothing is imported here, so the tables can be registered without importing the rest.
"""

__all__: list[str] = []
