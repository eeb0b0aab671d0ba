"""IMAP sync inside ingest: accounts spread over instances by a Kafka consumer group, each synced
with CONDSTORE/QRESYNC when offered (a UID-list comparison when not) and IDLE on INBOX."""
