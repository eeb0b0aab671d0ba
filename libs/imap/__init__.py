"""IMAP as a client: the bounded protocol layer over aioimaplib (:mod:`libs.imap.client`) and UID
sets kept as ranges (:mod:`libs.imap.uids`). ingest's sync and the gateway's content endpoints
share them."""
