"""Code shared by the flightlog services: settings, logging, Kafka, ids, shards, database."""
