"""pytest fixtures for the lab's guest (loaded by conftest.py)."""
