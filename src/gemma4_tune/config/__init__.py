"""A run's settings: one definition of every option (``RunConfig``), read from YAML, the CLI, or an Axolotl config."""

from gemma4_tune.config.options import RunConfig, build_config, load_yaml, read_run_file

__all__ = ["RunConfig", "build_config", "load_yaml", "read_run_file"]
