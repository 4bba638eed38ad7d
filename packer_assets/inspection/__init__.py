"""What a template holds: the checks run in its clone and the SBOM of its packages."""
