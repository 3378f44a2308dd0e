"""The store layer: one LMDB environment per volume and what is kept in it.

``codec`` (hashes, compression), ``schema`` (key and value layouts), ``lmdb``
(the environment, transactions, the meta table), ``lock`` (the writer lock);
each table through the module named for what it holds: ``journal`` (one record
per change, and ``apply``, the one writer of records), ``versions``, ``blocks``
(and packs), ``bookmarks``, ``replicas``, ``entries`` (the history tables as
stored); ``view`` (the volume as of any seq), ``pending`` (changes not yet
committed), ``refs`` (what extents reference), ``epochs`` (lineage). No module
outside this package touches a table handle.
"""
