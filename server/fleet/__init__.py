"""The fleet: device enrollment, credentials, inventory and device groups.

- :mod:`server.fleet.models` -- the tables (``devices``, ``provisioning_tokens``,
  ``device_credentials``, ``device_groups``, ``group_members``) and their API views.
- :mod:`server.fleet.enrollment` -- provisioning tokens, ``enroll`` and the operator's
  accept / reject / revoke.
- :mod:`server.fleet.auth` -- password hashing and :func:`~server.fleet.auth.authenticate_device`.
- :mod:`server.fleet.selectors` -- the dynamic-group selector language (pure).
- :mod:`server.fleet.groups` -- static and dynamic groups, ``members`` and ``group_device_ids``.
- :mod:`server.fleet.devices` -- inventory queries and tags.
- :mod:`server.fleet.inventory` -- device state, presence and events from MQTT into the
  inventory (:class:`~server.fleet.inventory.InventoryConsumer`).

This package's ``__init__`` imports nothing, so importing the tables (which
``server.models`` does for Alembic) pulls in neither FastAPI nor paho.
"""

__all__: list[str] = []
