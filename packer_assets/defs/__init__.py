"""The Dagster shell: assets, checks, jobs, sensors, schedules and resources; thin by design (they call
the core and report its results as metadata). `packer_assets/definitions.py` wires them."""
