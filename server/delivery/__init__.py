"""Artifact delivery to devices: the MQTT block server (``artifact/req`` → ``artifact/blk``).

HTTP range downloads are the other path; they are served by the models routes
(``server.api.routes.models``) straight from the artifact store.
"""
