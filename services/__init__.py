"""The flightlog services: ingest, transform, persist and gateway, one package each."""
