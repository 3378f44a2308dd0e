"""High availability: the primary role held as a lease on a coordination service.

``etcd`` (a client of etcd's v3 API from trio), ``lease`` (a lease this node holds,
and the deadline before which it may act on it).
"""
