"""Upload an exported LTM folder to the Hugging Face Hub (`HfApi.create_repo` + `HfApi.upload_folder`).

The folder is uploaded as it is, with one exception: a card exported without `--repo-id` names a marked placeholder
(`card.REPO_ID_PLACEHOLDER`), and the push writes the repository id in its place first (a card exported for another
repository is refused). A push that fails leaves the folder unchanged. Every request has a network timeout
(`modeling_ltm.tooling.cli_errors.bound_hub_requests`, `LTM_HUB_TIMEOUT` seconds): an endpoint that does not answer ends
the push with an error naming it.
`model.push_to_hub(...)` (transformers' own) uploads the same weights, config, remote code and generation config, and
keeps the card already on the Hub.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub import errors as hub_errors
from huggingface_hub.utils import validate_repo_id
from transformers.utils import logging

from modeling_ltm.tooling.cli_errors import (
    HubTimeoutError,
    bound_hub_requests,
    check_finite_safetensors,
    check_model_folder,
    hub_requests_bounded,
)

from .card import REPO_ID_PLACEHOLDER, fill_in_repo_id


logger = logging.get_logger(__name__)

REQUIRED_FILES = ("config.json", "README.md")
TOKEN_HELP = (
    "set the HF_TOKEN environment variable to a token with write access (https://huggingface.co/settings/tokens), "
    "run `hf auth login`, or pass --token (token= in Python)"
)
# Network-level failures of the Hub client: HfHubHTTPError and OfflineModeIsEnabled are OSErrors; the transport
# errors of the HTTP library are exposed by huggingface_hub.errors as HTTPError.
NETWORK_ERRORS = (OSError, getattr(hub_errors, "HTTPError", OSError))


class HubPushError(RuntimeError):
    """The push could not be done (no token, offline, or the Hub refused it); the message says what to do."""


def check_export_folder(folder: str | Path) -> Path:
    """Raise `ValueError` unless `folder` looks like an `ltm export` folder (config, weights, card) whose
    `config.json` parses and whose weights files are intact and finite (`NonFiniteWeightsError` names the first
    tensor holding NaN/inf)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; create one with `ltm export <checkpoint> {folder}`.")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("model.safetensors")
    if missing:
        raise ValueError(
            f"{folder} is missing {', '.join(missing)}; it is not an exported model folder. Run "
            f"`ltm export <checkpoint> {folder}` first."
        )
    check_model_folder(folder, "folder")  # a garbage config.json or a truncated .safetensors file, by name
    check_finite_safetensors(folder, "pushing")
    return folder


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (a reader sees the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Create `repo_id` on the Hub if needed and upload `folder` to it in one commit; returns the commit URL.

    Args:
        folder: an `ltm export` folder.
        repo_id: `"user/name"` or `"org/name"`.
        private: create the repository as private (ignored when it exists).
        revision: branch to push to (created from the default branch if missing); default: the main branch.
        commit_message: defaults to "Upload LTM with ltm-hf".
        token: a Hub token; defaults to HF_TOKEN or the one saved by `hf auth login`.
        api: the `HfApi` client to use (tests inject one).

    Raises:
        ValueError: the folder is not an export folder, a file in it is damaged, its weights hold NaN/inf,
            `repo_id` is malformed, or the folder's card was exported for another repository.
        HubPushError: no token, offline mode, or the Hub refused the request.
    """
    folder = check_export_folder(folder)
    try:
        validate_repo_id(repo_id)
    except hub_errors.HFValidationError as error:
        raise ValueError(f"Invalid repo_id {repo_id!r}: {error} Use the form 'user/name' or 'org/name'.") from error
    card_text = (folder / "README.md").read_text(encoding="utf-8")
    if REPO_ID_PLACEHOLDER not in card_text and f'"{repo_id}"' not in card_text:
        raise ValueError(
            f"The model card in {folder} was exported for another repository (its usage code does not load "
            f"{repo_id}); re-export it with `ltm export <checkpoint> {folder} --repo-id {repo_id} --overwrite`."
        )
    token = token or get_token()
    if not token:
        raise HubPushError(f"No Hugging Face token found to push to {repo_id}: {TOKEN_HELP}.")
    if constants.is_offline_mode():
        raise HubPushError(
            f"Cannot push to {repo_id}: HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) is set; unset it to reach the Hub."
        )

    filled = REPO_ID_PLACEHOLDER in card_text
    if filled:  # the card's code and commands load from the repository pushed to (put back if the push fails)
        write_text_atomically(folder / "README.md", fill_in_repo_id(card_text, repo_id))
    try:
        commit = _upload(folder, repo_id, api, private, revision, commit_message, token)
    except BaseException:
        if filled:
            write_text_atomically(folder / "README.md", card_text)
        raise
    if filled:
        logger.warning(f"Wrote {repo_id} into the model card of {folder} in place of {REPO_ID_PLACEHOLDER}.")
    return str(getattr(commit, "commit_url", None) or commit)


def _upload(folder: Path, repo_id: str, api, private, revision, commit_message, token):
    """`create_repo` (+ `create_branch`) and `upload_folder`, with the Hub's errors as `HubPushError`s."""
    if not hub_requests_bounded():  # `ltm push` bounds them already; a Python caller gets the same timeouts
        bound_hub_requests()
    api = api or HfApi()
    endpoint = getattr(api, "endpoint", None) or constants.ENDPOINT
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        repo_id = getattr(repo_url, "repo_id", None) or repo_id
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model", token=token)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or "Upload LTM with ltm-hf",
            token=token,
        )
    except hub_errors.OfflineModeIsEnabled as error:
        raise HubPushError(
            f"Cannot push to {repo_id}: offline mode is enabled ({error}); unset HF_HUB_OFFLINE."
        ) from error
    except HubTimeoutError as error:
        raise HubPushError(f"Cannot push {folder} to {repo_id}: {error}.") from error
    except NETWORK_ERRORS as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubPushError(
                f"The Hub refused the token for {repo_id} (HTTP {status}): {TOKEN_HELP}, with write access to "
                f"the namespace of {repo_id}."
            ) from error
        raise HubPushError(
            f"Pushing {folder} to {repo_id} at {endpoint} failed ({type(error).__name__}: {error}). Check the network "
            "connection (or a proxy via HTTPS_PROXY) and that the token may write to that repository."
        ) from error
    return commit


__all__ = ["HubPushError", "check_export_folder", "push_folder"]
