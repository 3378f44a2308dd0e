"""cdpfs: a filesystem with continuous data protection, as a library.

Layers, lowest first (docs/architecture.md): ``errors``, ``system`` and
``counters``; ``store``; ``history``; ``fs`` and ``replication``; ``volume`` (the
service every front end and tool starts); ``testing``. The FUSE front end
(``cdpfs.mount``) and the command line (``cdpfs.tools``) sit on top and are
never imported from here.
"""
