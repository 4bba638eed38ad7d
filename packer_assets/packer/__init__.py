"""Running HashiCorp Packer: version differences (version), work directories (workdir), the build
environment (env) and the process itself (runner). No Dagster import here: this is the core."""
