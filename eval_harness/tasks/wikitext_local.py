"""`wikitext2_local`: rolling perplexity over a local WikiText-style raw file, one document per article.

Default data: `../shared/data/wikitext-2-raw/wiki.test.raw` (the WikiText-2 raw test set, 62 articles). Override
with `$LTM_EVAL_WIKITEXT` or `--metadata '{"wikitext_path": "..."}'`. Any plain-text file works: articles start at
top-level headings (`" = Title = "`, as in WikiText); a file without such headings is one document.

Documents match the `page` field of `EleutherAI/wikitext_document_level` (the dataset of lm-eval's `wikitext`
task), so lm-eval's own detokenizer and word/byte counting are reused unchanged.
"""

import re

import datasets

from eval_harness.tasks._paths import resolve_data_path


DEFAULT_PATH = "../shared/data/wikitext-2-raw/wiki.test.raw"
ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def split_articles(text: str) -> list[str]:
    """Split raw WikiText into articles at top-level headings; blank lines are dropped, line breaks kept."""
    articles: list[list[str]] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        if ARTICLE_HEADING.match(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["\n".join(lines) + "\n" for lines in articles]


def load_documents(wikitext_path: str | None = None, **metadata) -> datasets.DatasetDict:
    """`custom_dataset` of the task: `DatasetDict(test=Dataset({"page": [...]}))`. lm-eval passes the task's
    metadata (and model_args from the CLI) as keyword arguments; only `wikitext_path` is read."""
    path = resolve_data_path(wikitext_path, "LTM_EVAL_WIKITEXT", DEFAULT_PATH)
    pages = split_articles(path.read_text(encoding="utf-8"))
    return datasets.DatasetDict(test=datasets.Dataset.from_dict({"page": pages}))
