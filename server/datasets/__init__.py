"""Datasets: upload, validation, immutable versions, seeded splits, bundled examples."""
