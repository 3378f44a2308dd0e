"""High availability: the primary role held as a lease on a coordination service.

``etcd`` (a client of etcd's v3 API from trio), ``lease`` (a lease this node holds,
and the deadline before which it may act on it), ``fence`` (whether this node may
still change its volume: the deadline where the changes are made).
"""
