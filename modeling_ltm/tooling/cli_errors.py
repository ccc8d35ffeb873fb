"""The one place where the `ltm` commands turn errors into one-line messages (exit code 2).

Every command (`ltm train | eval | generate | export | push`, `python -m eval_harness`) runs its body through
`run_cli`: an error the user can fix (bad flags, files, data or numbers; the project's own errors and the common
library ones below) is printed as ONE line, `<command>: error: <problem, file and fix>`, and the command returns
`EXIT_CODE`. `--debug` anywhere on the command line re-raises it with the full traceback instead. Unexpected errors
(bugs) keep their traceback.

The checks of a model folder (`check_model_folder`) and of `--device` (`resolve_device`) live here too, so that a
truncated `model.safetensors`, a garbage `config.json` or pickled weights are blamed by path before any library reads
them. `run_cli` also bounds every request of huggingface_hub's shared HTTP client by a network timeout
(`bound_hub_requests`): an endpoint that accepts and never answers ends the command with one line naming it.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from safetensors import SafetensorError


EXIT_CODE = 2
DEBUG_FLAG = "--debug"
# Seconds a Hub request may wait for a connection, for the next bytes of an answer or to send its next bytes (a
# stall, not a bound on a whole download), where the caller set no timeout of its own; huggingface_hub's file
# downloads keep theirs (`HF_HUB_ETAG_TIMEOUT`, `HF_HUB_DOWNLOAD_TIMEOUT`). Set with the environment variable.
HUB_TIMEOUT_ENV = "LTM_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 60.0
# Names of the weights files that are Python pickles: never loaded by `ltm` (safetensors only).
PICKLED_WEIGHTS_PATTERNS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "*.pt", "*.pth", "*.ckpt")


class CLIError(ValueError):
    """A problem the user can fix; the message names the problem, the file and the fix."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`" (did you mean 'x'?)"` for the closest of `choices` (difflib), or `""`."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return error


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and the errors it was raised from or while handling, outermost first."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        chain.append(error)
        seen.add(id(error))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return chain


_NO_SPACE = re.compile(r"No space left on device|StorageFull|os error 28|code: 28\b")


def _disk_full_message(error: BaseException) -> str | None:
    """A full disk (ENOSPC, also inside safetensors' "Error while serializing"), named as such, not as corruption."""
    for link in _chain(error):
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            where = f" writing {link.filename}" if link.filename else ""
            return (
                f"the disk is full{where} ({link.strerror or link}); free some space or write to another disk "
                "(--output_dir / the output folder), then run the command again."
            )
        if _NO_SPACE.search(str(link)):
            return (
                f"the disk is full ({one_line(link)[:200]}); free some space or write to another disk (--output_dir / "
                "the output folder), then run the command again."
            )
    return None


def message_for(error: BaseException) -> str | None:
    """The one-line message for a known kind of error, or None for an unexpected one (a bug: keep its traceback)."""
    name = type(error).__name__
    full = _disk_full_message(error)
    if full is not None:
        return full
    network = _hub_timeout_message(error)
    if network is not None:
        return network
    if isinstance(error, SafetensorError):
        return (
            f"a .safetensors weights file is truncated or corrupt ({error}); re-save the model "
            "(`ltm train` / save_pretrained) or copy the file again."
        )
    if name in ("DatasetGenerationError", "DatasetBuildError"):
        return (
            f"the dataset could not be read ({type(_root_cause(error)).__name__}: {_root_cause(error)}); check the "
            "files given with --dataset / --data_files (e.g. one JSON object per line for .jsonl)."
        )
    if name == "UnpicklingError" or "weights_only" in str(error):
        # torch's refusal to unpickle: its advice to turn weights_only off must not reach the user
        return (
            f"a pickled weights file was refused ({one_line(str(error).split('.')[0])[:160]}): ltm loads safetensors "
            "only; re-save the model with save_pretrained (safetensors) where you trust the file."
        )
    if isinstance(error, AssertionError) and "CUDA" in str(error):
        return f"CUDA is not available here ({error}); pass --device cpu."
    if name == "OutOfMemoryError":
        return f"out of memory on the device ({one_line(error)[:200]}); lower the batch size or use a smaller model."
    if isinstance(error, json.JSONDecodeError):
        return f"invalid JSON ({error}); fix the file named by the flag you passed."
    if name in ("StrictDataclassFieldValidationError", "StrictDataclassClassValidationError"):  # LTMConfig's checks
        return f"invalid model configuration: {one_line(error)}; fix that value in the config JSON (or the flag)."
    # The project's own errors (ValueError / TypeError naming the argument, NonFiniteWeightsError, NonFiniteELBOError,
    # TrainCLIError, CLIError) already say what to fix.
    if isinstance(error, (ValueError, TypeError, FloatingPointError)):
        return str(error)
    if isinstance(error, (OSError, RuntimeError)) and _is_user_facing(error):
        return str(error)
    return None


def _is_user_facing(error: BaseException) -> bool:
    """OSErrors (missing files, Hub and network failures) and the project's own RuntimeErrors speak to the user."""
    if isinstance(error, OSError):
        return True
    module = type(error).__module__ or ""
    return module.startswith(("modeling_ltm", "hub_cards", "eval_harness"))


def run_cli(prog: str, body: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `body(argv)` (argv without `--debug`); print a known error as one line on stderr and return `EXIT_CODE`.

    With `--debug` in `argv`, errors propagate with their full traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        bound_hub_requests()
        return body(argv) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        message = message_for(error)
        if message is None:
            raise
        print(f"{prog}: error: {one_line(message)} (run with {DEBUG_FLAG} for the full traceback)", file=sys.stderr)
        return EXIT_CODE


# ---------------------------------------------------------------------------------------------------------------
# Network timeouts of the Hub client
# ---------------------------------------------------------------------------------------------------------------


class HubTimeoutError(TimeoutError):
    """A Hub endpoint gave no answer within the network timeout; later requests to it fail at once."""


def hub_timeout_seconds() -> float:
    """`$LTM_HUB_TIMEOUT` (seconds > 0), else `DEFAULT_HUB_TIMEOUT`."""
    value = os.environ.get(HUB_TIMEOUT_ENV)
    try:
        seconds = float(value) if value else DEFAULT_HUB_TIMEOUT
    except ValueError:
        raise CLIError(
            f"{HUB_TIMEOUT_ENV}={value!r} is not a number of seconds; set e.g. {HUB_TIMEOUT_ENV}=60."
        ) from None
    if not 0 < seconds < float("inf"):
        raise CLIError(f"{HUB_TIMEOUT_ENV}={value!r} must be a number of seconds > 0, e.g. {HUB_TIMEOUT_ENV}=60.")
    return seconds


class HubRequestBound:
    """Request and response hooks of huggingface_hub's shared HTTP client (`huggingface_hub.get_session()`, which
    transformers, datasets, lm-eval and `HfApi` all use).

    - Every timeout the caller left unset (`timeout=None`: `HfApi` calls such as `model_info` or `create_repo` pass
      it) becomes `seconds`, for the connection, each read, each write and the connection pool.
    - A request of this thread that got no answer for its whole timeout makes the endpoint unreachable for the rest of
      the command: the next request to it (huggingface_hub retries a timed-out request up to 5 times, file after
      file) raises `HubTimeoutError` at once, naming the endpoint, instead of waiting minutes.

    Hooks rather than huggingface_hub's own bounds: `HF_HUB_ETAG_TIMEOUT` / `HF_HUB_DOWNLOAD_TIMEOUT` cover only
    `hf_hub_download`'s requests, and a client factory's default timeout (`set_client_factory(lambda:
    httpx.Client(timeout=60))`) is overridden by the explicit `timeout=None` that `HfApi` methods pass (observed: such
    a request to a server that never answers was still waiting after 5 s under a 1 s client default), nor does either
    stop the 5 retries per request.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.pending: dict[tuple[int, str], tuple[float, float, str]] = {}
        self.unreachable: dict[str, str] = {}
        self.lock = threading.Lock()

    @staticmethod
    def endpoint(request) -> str:
        url = request.url
        return f"{url.scheme}://{url.host}" + (f":{url.port}" if url.port else "")

    def on_request(self, request) -> None:
        given = dict(request.extensions.get("timeout") or {})
        limits = {k: self.seconds if given.get(k) is None else given[k] for k in ("connect", "read", "write", "pool")}
        request.extensions["timeout"] = limits
        endpoint, now = self.endpoint(request), time.monotonic()
        key = (threading.get_ident(), endpoint)
        with self.lock:
            if endpoint in self.unreachable:
                raise HubTimeoutError(self.unreachable[endpoint])
            previous = self.pending.get(key)
            if previous is not None and now - previous[0] >= 0.9 * previous[1]:
                self.unreachable[endpoint] = (
                    f"the Hub endpoint {endpoint} gave no answer within {previous[1]:g} s ({previous[2]})"
                )
                raise HubTimeoutError(self.unreachable[endpoint])
            wait = min(limits["connect"], limits["read"])
            if wait >= min(self.seconds, 10.0):  # not a quick probe whose caller expects it to fail now and then
                self.pending[key] = (now, wait, f"{request.method} {request.url}")
            else:
                self.pending.pop(key, None)

    def on_response(self, response) -> None:
        with self.lock:
            self.pending.pop((threading.get_ident(), self.endpoint(response.request)), None)


_HUB_BOUND: HubRequestBound | None = None


def bound_hub_requests(seconds: float | None = None) -> HubRequestBound | None:
    """Install (or reset) `HubRequestBound` on huggingface_hub's shared client; `run_cli` calls it for every command.
    Returns None when huggingface_hub is not installed."""
    global _HUB_BOUND
    try:
        from huggingface_hub import get_session
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    seconds = hub_timeout_seconds() if seconds is None else seconds
    client = get_session()
    hooks = {kind: list(client.event_hooks.get(kind, [])) for kind in ("request", "response")}
    hooks["request"] = [
        hook for hook in hooks["request"] if not isinstance(getattr(hook, "__self__", None), HubRequestBound)
    ]
    hooks["response"] = [
        hook for hook in hooks["response"] if not isinstance(getattr(hook, "__self__", None), HubRequestBound)
    ]
    _HUB_BOUND = HubRequestBound(seconds)
    hooks["request"].append(_HUB_BOUND.on_request)
    hooks["response"].append(_HUB_BOUND.on_response)
    client.event_hooks = hooks
    return _HUB_BOUND


def hub_requests_bounded() -> bool:
    """Whether `bound_hub_requests` hooks are on huggingface_hub's current shared client."""
    try:
        from huggingface_hub import get_session
    except ImportError:  # pragma: no cover
        return False
    hooks = get_session().event_hooks.get("request", [])
    return any(isinstance(getattr(hook, "__self__", None), HubRequestBound) for hook in hooks)


_TIMEOUT_CLASS = re.compile(r"(Read|Connect|Write|Pool)?Timeout(Exception)?$")


def _hub_timeout_message(error: BaseException) -> str | None:
    """One line for a Hub request that timed out (or an error raised after an endpoint became unreachable)."""
    found = None
    for link in _chain(error):
        if isinstance(link, HubTimeoutError):
            found = str(link)
            break
        if _TIMEOUT_CLASS.search(type(link).__name__) and getattr(link, "request", None) is not None:
            try:
                found = f"no answer from the Hub endpoint {HubRequestBound.endpoint(link.request)} ({link})"
            except Exception:  # a request-less timeout
                found = None
            if found:
                break
    if found is None and _HUB_BOUND is not None and _HUB_BOUND.unreachable:
        found = next(iter(_HUB_BOUND.unreachable.values()))  # a library turned our error into its own
    if found is None:
        return None
    return (
        f"{found}; check the network connection, a proxy (HTTPS_PROXY) and HF_ENDPOINT, raise the timeout with "
        f"{HUB_TIMEOUT_ENV}=SECONDS, or work from the local cache with HF_HUB_OFFLINE=1."
    )


# ---------------------------------------------------------------------------------------------------------------
# Checks shared by the commands
# ---------------------------------------------------------------------------------------------------------------


def resolve_device(device: str | None, flag: str = "--device") -> str:
    """`device`, or `cuda` when available else `cpu`; `CLIError` for a device torch cannot use here."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise CLIError(f"{flag} {device!r} is not a device ({error}); use cpu, cuda or cuda:N.") from error
    if parsed.type == "meta":
        raise CLIError(
            f"{flag} {device}: the meta device holds shapes without data and cannot run a model; use cpu, cuda or "
            "cuda:N."
        )
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise CLIError(
                f"{flag} {device}: CUDA is not available (torch {torch.__version__} is {build}, or no GPU is "
                "visible); pass --device cpu."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CLIError(
                f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible; use cuda:0 "
                f"to cuda:{torch.cuda.device_count() - 1}."
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"{flag} {device}: MPS is not available on this machine; pass --device cpu.")
    return device


def check_model_folder(path: str | Path, flag: str = "model folder", model_type: str | None = None) -> Path:
    """Raise `CLIError` naming the file unless `path` is a folder whose `config.json` is a JSON object with a
    `model_type` (equal to `model_type` when given) and whose weights are `*.safetensors` files with intact headers (a
    truncated file fails here, by name). Pickled weights (`pytorch_model.bin`, ...) are refused unopened."""
    path = Path(path)
    config_path = path / "config.json"
    if not path.exists():
        raise no_such_folder(path, flag)
    if not path.is_dir() or not config_path.is_file():
        raise CLIError(
            f"{flag} {str(path)!r} is not a saved model folder (no config.json); train one with `ltm train` or pass "
            "the folder written by save_pretrained."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CLIError(
            f"{config_path} is not valid JSON ({error}): the model folder is damaged; re-save the model "
            "(save_pretrained / `ltm train`) or restore config.json."
        ) from error
    if not isinstance(config, dict) or "model_type" not in config:
        raise CLIError(
            f"{config_path} is not a model config (a JSON object with a 'model_type'); re-save the model or restore "
            "config.json."
        )
    if model_type is not None and config["model_type"] != model_type:
        raise CLIError(
            f"{config_path} describes a model of type {config['model_type']!r}, not {model_type!r}: {flag} "
            f"{str(path)!r} is not an LTM folder (its weights would not load into this model); pass the folder "
            "written by `ltm train` / save_pretrained of an LTM."
        )
    check_weight_files(path, flag)
    check_generation_config(path / "generation_config.json")
    return path


def check_weight_files(path: Path, flag: str) -> None:
    """`CLIError` unless the weights of the model folder `path` are `*.safetensors` files with intact headers;
    pickled weights are refused unopened."""
    from safetensors import safe_open

    safetensors = sorted(path.glob("*.safetensors"))
    pickled = sorted({p for pattern in PICKLED_WEIGHTS_PATTERNS for p in path.glob(pattern)})
    if pickled and not safetensors:
        raise CLIError(
            f"{pickled[0]} holds pickled PyTorch weights, and ltm never unpickles a file (loading a pickle can run "
            "code); re-save the model as safetensors where you trust the file (`AutoModelForCausalLM.from_pretrained"
            "(folder).save_pretrained(folder)` writes model.safetensors) and load that."
        )
    if not safetensors and not (path / "model.safetensors.index.json").is_file():
        raise CLIError(
            f"{flag} {str(path)!r} has no weights (no *.safetensors file); pass a folder written by save_pretrained "
            "or `ltm train`."
        )
    for weights in safetensors:
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except SafetensorError as error:
            raise CLIError(
                f"{weights} is truncated or corrupt ({error}); re-save the model (save_pretrained / `ltm train`) or "
                "copy the file again."
            ) from error


def check_generation_config(generation_config: Path) -> None:
    """`CLIError` when a model folder's `generation_config.json` is there but not a JSON object."""
    if generation_config.is_file():  # transformers ignores a damaged one silently (the defaults of config.json)
        try:
            parsed = json.loads(generation_config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            parsed = error
        if not isinstance(parsed, dict):
            problem = f"is not valid JSON ({parsed})" if isinstance(parsed, Exception) else "is not a JSON object"
            raise CLIError(
                f"{generation_config} {problem}, so the model's generation and inference-step defaults would be "
                "silently replaced; restore it (`model.generation_config.save_pretrained(folder)`) or delete it to "
                "use the defaults of config.json."
            )


def no_such_folder(path: str | Path, flag: str) -> CLIError:
    """`CLIError`: `path` does not exist, naming the current directory (for a relative path) and a close name."""
    path = Path(path)
    where = "" if path.expanduser().is_absolute() else f" (relative to the current directory {Path.cwd()})"
    parent = path.expanduser().parent
    hint = did_you_mean(path.name, (p.name for p in parent.iterdir())) if parent.is_dir() else ""
    named = f"{flag}{path}" if flag.endswith("=") else f"{flag} {str(path)!r}"
    return CLIError(
        f"{named}: no such folder{where}{hint}; pass the folder written by `ltm train` / save_pretrained."
    )


def looks_like_a_local_path(name: str) -> bool:
    """Whether a model name that is no existing file or folder was meant as a local folder rather than a Hub id:
    it starts with `.`, `/` or `~`, holds a backslash or more than one `/`, is no valid Hub repository id, or its first
    part is a folder here (`runs/ltm-tiy` beside `runs/`)."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # pragma: no cover - a dependency of transformers
        return "/" in name
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def check_loading_info(info: dict, source: str | Path, action: str) -> None:
    """`CLIError` naming `source`, the tensors (first few) and the fix when `from_pretrained`'s loading info
    (`output_loading_info=True`) lists missing, unexpected or mismatched tensors: a missing tensor would be newly
    initialised (random), an unexpected one dropped. Tied weights are not missing (transformers leaves them out)."""
    problems = []
    for key, what in (
        ("missing_keys", "missing (they would be random)"),
        ("unexpected_keys", "not part of this model"),
        ("mismatched_keys", "of another shape"),
    ):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if names:
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            problems.append(f"{len(names)} tensor(s) {what}: {shown}")
    if problems:
        raise CLIError(
            f"the weights in {source} do not match the model of its config.json ({'; '.join(problems)}), found before "
            f"{action}; the weights file is damaged or belongs to another model: re-save the model (`ltm train` / "
            "save_pretrained), use an earlier checkpoint, or copy the files again."
        )


def load_checked_model(path: str | Path, action: str, model_class=None, **kwargs):
    """`model_class.from_pretrained(path, **kwargs)` (default `AutoModelForCausalLM`), refused by
    `check_loading_info` when the files lack a tensor of the model (it would be newly initialised), hold one it does
    not have, or one of another shape. `ltm generate`, `ltm eval` (`LTMLM`) and `ltm export` load through it."""
    import logging

    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    kwargs.setdefault("ignore_mismatched_sizes", True)  # reported below, in one line, instead of a RuntimeError

    def no_load_report(record: logging.LogRecord) -> bool:  # transformers' table; the error below names the tensors
        return "LOAD REPORT" not in str(record.msg)

    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(no_load_report)
    try:
        model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        report_logger.removeFilter(no_load_report)
    check_loading_info(info, path, action)
    return model


def check_finite_safetensors(folder: str | Path, action: str) -> None:
    """`NonFiniteWeightsError` naming the file and the first tensor of `folder`'s `*.safetensors` files that holds
    NaN/inf (tensors read one at a time, without building the model)."""
    from safetensors import safe_open

    from ..weight_checks import check_finite_weights

    for weights in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as tensors:
            check_finite_weights(((name, tensors.get_tensor(name)) for name in tensors.keys()), action, str(weights))


__all__ = [
    "CLIError",
    "DEBUG_FLAG",
    "DEFAULT_HUB_TIMEOUT",
    "EXIT_CODE",
    "HUB_TIMEOUT_ENV",
    "HubRequestBound",
    "HubTimeoutError",
    "bound_hub_requests",
    "check_finite_safetensors",
    "check_loading_info",
    "check_model_folder",
    "did_you_mean",
    "hub_requests_bounded",
    "load_checked_model",
    "looks_like_a_local_path",
    "message_for",
    "no_such_folder",
    "one_line",
    "resolve_device",
    "run_cli",
]
