"""Where the local tasks find their data: a `--metadata` key, else an environment variable, else a default path.

Relative paths resolve against the current directory (as everywhere in lm-eval); the defaults assume the repository
root, where the shared data lives at `../shared/data/`.
"""

import os
from pathlib import Path


def resolve_data_path(value: str | None, env_var: str, default: str) -> Path:
    """`value` (from `--metadata '{"key": ...}'` / `TaskManager(metadata=...)`), else `$env_var`, else `default`."""
    path = Path(value or os.environ.get(env_var) or default).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Task data not found at {str(path)!r} (resolved against the current directory {os.getcwd()!r}). Set "
            f"${env_var} or pass --metadata with the path, or run from the repository root."
        )
    return path
