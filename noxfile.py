"""nox sessions; see README."""
