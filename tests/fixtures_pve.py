"""pytest fixtures for the lab's pve (loaded by conftest.py)."""
