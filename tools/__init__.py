"""The ``cdpfs`` command line (installed as ``cdpfs.tools``)."""
