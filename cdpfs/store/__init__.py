"""The store layer: one LMDB environment per volume and what is kept in it.

``codec`` (hashes, compression), ``schema`` (key and value layouts), ``lmdb``
(the environment, blocks, packs), ``lock`` (the writer lock), ``journal`` (one
record per change), ``view`` (the volume as of any seq), ``refs`` (what extents
reference).
"""
