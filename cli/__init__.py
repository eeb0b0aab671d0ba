"""The ``flightlog`` operator command: local stack, schemas, topics, shards and services."""
