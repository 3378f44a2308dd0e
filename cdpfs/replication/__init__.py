"""Replication: shipping a volume's journal to replica stores on other machines.

``protocol`` (what both sides agree on), ``wire`` (checked frames), ``credentials``
(TLS identities), ``batches`` (what is sent), ``sender`` (the primary's side),
``receiver`` (the replica's side), ``registry`` (the replicas table), ``fanout``
(the senders of a served store, sync waits), ``assess`` (what replication would
send).
"""
