"""The Dagster shell: resources, assets, checks (and later sensors, schedules, jobs). Thin by design."""
