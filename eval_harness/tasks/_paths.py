"""Where the local tasks find their data: a `--metadata` key, else an environment variable, else the task's default.

A path given either way must exist (relative paths resolve against the current directory, as everywhere in lm-eval).
Without one, each task falls back to data every user has: the public dataset through `datasets` (`wikitext2_local`)
or the embedded default corpus that `ltm train` fetches and caches (`lambada_local`); when that is unavailable
(offline, not cached), `MissingTaskDataError` names the variable and the `--metadata` key that supply a local file.
"""

import os
from pathlib import Path


class MissingTaskDataError(FileNotFoundError):
    """A task's data is neither given as a local file nor obtainable (offline and not cached); the message is one line
    naming the environment variable and the `--metadata` key that supply a local file."""


def given_path(value: str | None, env_var: str) -> str | None:
    """`value` (from `--metadata '{"key": ...}'` / `TaskManager(metadata=...)`), else `$env_var`, else None."""
    return value or os.environ.get(env_var) or None


def resolve_data_path(value: str | None, env_var: str, metadata_key: str) -> Path:
    """The existing file named by `value`, else by `$env_var`; a `MissingTaskDataError` naming both otherwise."""
    given = given_path(value, env_var)
    if given is None:
        raise MissingTaskDataError(
            f"No data file given: set ${env_var} or pass --metadata '{{\"{metadata_key}\": PATH}}'."
        )
    path = Path(given).expanduser()
    if not path.is_file():
        source = f"--metadata {metadata_key}" if value else f"${env_var}"
        raise MissingTaskDataError(
            f"Task data not found at {str(path)!r} (from {source}, resolved against the current directory "
            f"{os.getcwd()!r}); point ${env_var} or --metadata '{{\"{metadata_key}\": PATH}}' at an existing file."
        )
    return path
