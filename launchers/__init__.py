"""Launchers: how the ranks of a run are started (importable as `cascade_launchers`)."""
