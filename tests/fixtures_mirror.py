"""pytest fixtures for the lab's mirror (loaded by conftest.py)."""
