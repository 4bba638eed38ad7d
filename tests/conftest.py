"""Shared fixtures. The lab's fixtures live in fixtures_<part>.py, one module per lab part."""

pytest_plugins = ["fixtures_lab", "fixtures_pve", "fixtures_mirror", "fixtures_guest", "fixtures_sshd",
                  "fixtures_postgres"]
