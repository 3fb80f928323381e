"""Run configuration: RunConfig (``options``) and the run-file readers beside it (``run_file``)."""

from gemma4_tune.config.options import RunConfig, build_config
from gemma4_tune.config.run_file import ImportedConfig, load_yaml, read_run_file

__all__ = ["ImportedConfig", "RunConfig", "build_config", "load_yaml", "read_run_file"]
