"""Storage: the seam, and the stores below it.

The seam is `base.py` (`Store`, what the server and the CLI talk to, and `open_store`) and `model.py` (the
store-neutral types and errors they share). Stores live below it, one package each: `sqlite/`, the default, keeps
one database file in the data directory. `server/`, `tui/` and the CLI import storage only through the seam
(tests/test_layers.py checks).
"""
