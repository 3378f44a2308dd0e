"""History: moments, kept points, bookmarks, versions, pruning and checks.

``moments`` (parsing ``@`` names), ``retention`` (the policy), ``points`` (kept
points and the one moment resolver), ``bookmarks`` (named points and holds),
``versions`` (a file's versions, diffs), ``prune``, ``stats``, ``verify``,
``treehash``.
"""
