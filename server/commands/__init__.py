"""The operator commands of `edgefleet`, each talking to the REST API."""
