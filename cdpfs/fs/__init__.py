"""Filesystem semantics over the store, for every front end.

``mutate`` (journaled changes of the live volume), ``engine`` (the live writer,
group commit), ``vfs`` (the live volume as a filesystem), ``timefs`` (the live
volume plus its ``@`` history: what front ends call).
"""
