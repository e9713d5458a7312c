"""`pulse tui`: the terminal dashboard."""
