"""Ingestion: what devices report over MQTT, validated and stored once."""
