"""Engines: executors of the selector's steps (``docs/SPEC.md`` "Engines").

- :mod:`.base`: what every engine shares (resolve the fingerprints, score one chunk through
  ``ScoreWriter``, the in-process engine, the plan, merge) -- below the selector in the import graph;
- :mod:`.local`, :mod:`.ray`, :mod:`.shards`: the scale-out engines, above the selector;
- :mod:`.dispatch`: ``run`` / ``execute`` pick an engine (what the CLI and ``trim-select run`` call).
"""
