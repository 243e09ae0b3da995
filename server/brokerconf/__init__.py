"""Broker identities and access: a Mosquitto configuration kept in step with the fleet.

- :mod:`server.brokerconf.rules` -- which identity may publish, subscribe to and
  receive which topic (pure); shared by Mosquitto's ACL and the embedded broker.
- :mod:`server.brokerconf.render` -- the text of ``mosquitto.conf``, the password files
  and the ACL files (pure).
- :mod:`server.brokerconf.writer` -- :class:`~server.brokerconf.writer.BrokerConfigWriter`:
  reads the database, replaces the files atomically, makes Mosquitto reload.
- :mod:`server.brokerconf.revision` -- the credentials revision every change of broker
  logins moves, in the change's own transaction.
- :mod:`server.brokerconf.follow` -- :class:`~server.brokerconf.follow.CredentialsFollower`:
  each API process with a configuration folder follows changes made through any other.
- :mod:`server.brokerconf.hooks` -- how the API reaches the writer and starts the follower.
- :mod:`server.brokerconf.access` -- :class:`~server.brokerconf.access.FleetAccess`, the
  same rules checked live against the database, for the embedded broker.

What always holds: a device may only use ``ef/v1/dev/<its own id>/#`` in the directions
the wire contract gives it; only accepted devices with a live credential and the
server's own service identity can log in; anonymous clients are refused.

This ``__init__`` imports nothing, so the embedded broker can import the rules without
FastAPI.
"""

__all__: list[str] = []
