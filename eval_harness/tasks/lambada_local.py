"""`lambada_local`: LAMBADA-style last-word prediction over a local JSONL of `{"text": ...}` lines.

Each item's target is its last whitespace-separated word, predicted from everything before it (lm-eval's
`lambada_openai` prompt and metrics: accuracy of greedily producing the word, perplexity of the word).

Data, in order of precedence:
1. a JSONL file named by `--metadata '{"lambada_path": "..."}'` or `$LTM_EVAL_LAMBADA` (e.g. the real LAMBADA test
   set, or items written by this module's command line);
2. otherwise, items derived deterministically from a plain-text play in Tiny Shakespeare format (`Speaker:` line,
   speech lines, blank line), by default the last 10% of `../shared/data/tinyshakespeare/input.txt`
   (`$LTM_EVAL_LAMBADA_SOURCE` / `lambada_source` to change it). They are built in memory; nothing is copied.

Derivation, in the spirit of LAMBADA's filtering (the target word must be inferable from the broader passage):
consecutive speeches (`"Speaker: speech lines joined"`) are gathered until the passage has at least `min_words`
words; when the passage's final word (punctuation stripped) is alphabetic, at least 3 letters long and already
occurs earlier in the passage, the passage becomes an item ending in that bare word; a passage longer than
`max_words` without such an ending is dropped. Write the items to a file with

    python eval_harness/tasks/lambada_local.py --source ../shared/data/tinyshakespeare/input.txt --output items.jsonl
"""

import argparse
import json
import os
import re

import datasets

from eval_harness.tasks._paths import resolve_data_path


DEFAULT_SOURCE = "../shared/data/tinyshakespeare/input.txt"
HELD_OUT_FRACTION = 0.1
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def _speeches(text: str) -> list[str]:
    """`"Speaker: speech"` strings from blank-line-separated blocks whose first line is `Speaker:`."""
    speeches = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [line.strip() for line in block.strip().split("\n") if line.strip()]
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
    if lambada_path or os.environ.get("LTM_EVAL_LAMBADA"):
        path = resolve_data_path(lambada_path, "LTM_EVAL_LAMBADA", "")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not rows or any(not isinstance(row.get("text"), str) for row in rows):
            raise ValueError(f"{path} must hold one JSON object with a string field 'text' per line.")
        texts = [row["text"] for row in rows]
    else:
        source = resolve_data_path(lambada_source, "LTM_EVAL_LAMBADA_SOURCE", DEFAULT_SOURCE)
        texts = [item["text"] for item in lambada_items(held_out_tail(source.read_text(encoding="utf-8")))]
    return datasets.DatasetDict(test=datasets.Dataset.from_dict({"text": texts}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write LAMBADA-style items derived from a play-formatted text file.")
    parser.add_argument("--source", default=DEFAULT_SOURCE, help="text in Tiny Shakespeare format")
    parser.add_argument("--output", required=True, help="JSONL file to write ({'text': ...} per line)")
    parser.add_argument("--held-out-fraction", type=float, default=HELD_OUT_FRACTION, help="use the last part only")
    parser.add_argument("--min-words", type=int, default=40)
    parser.add_argument("--max-words", type=int, default=120)
    args = parser.parse_args(argv)
    with open(args.source, encoding="utf-8") as f:
        text = f.read()
    if args.held_out_fraction < 1:
        text = held_out_tail(text, args.held_out_fraction)
    items = lambada_items(text, args.min_words, args.max_words)
    with open(args.output, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    print(f"wrote {len(items)} items to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
