"""Local lm-eval tasks (`--include_path eval_harness/tasks`): YAML configs and the Python helpers they name."""
