"""`wikitext2_local`: rolling perplexity over WikiText-2's raw test set, or a local WikiText-style file, one
document per article.

Data, in order of precedence:
1. a local file named by `--metadata '{"wikitext_path": "..."}'` or `$LTM_EVAL_WIKITEXT` (e.g. WikiText-2's
   `wiki.test.raw`, 62 articles). Any plain-text file works: articles start at top-level headings (`" = Title = "`,
   as in WikiText); a file without such headings is one document;
2. otherwise the public WikiText-2 raw test set through `datasets` (`EleutherAI/wikitext_document_level`,
   `wikitext-2-raw-v1`: what lm-eval's `wikitext` task reads), downloaded once and cached; offline and not cached, the
   task stops with one line naming the variable and the metadata key.

Documents match the `page` field of `EleutherAI/wikitext_document_level` (the dataset of lm-eval's `wikitext`
task), so lm-eval's own detokenizer and word/byte counting are reused unchanged.
"""

import re

import datasets

from eval_harness.tasks._paths import MissingTaskDataError, given_path, resolve_data_path


ENV_VAR = "LTM_EVAL_WIKITEXT"
METADATA_KEY = "wikitext_path"
PUBLIC_DATASET = ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1")
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
    if given_path(wikitext_path, ENV_VAR) is not None:
        path = resolve_data_path(wikitext_path, ENV_VAR, METADATA_KEY)
        pages = split_articles(path.read_text(encoding="utf-8"))
    else:
        pages = public_test_pages()
    return datasets.DatasetDict(test=datasets.Dataset.from_dict({"page": pages}))


def public_test_pages() -> list[str]:
    """The articles of WikiText-2's raw test set through `datasets` (network once, then its cache)."""
    name, config = PUBLIC_DATASET
    try:
        return list(datasets.load_dataset(name, config, split="test")["page"])
    except Exception as error:  # offline and not cached, the Hub unreachable, ...
        raise MissingTaskDataError(
            f"wikitext2_local: WikiText-2 ({name}, {config}) could not be loaded through `datasets` "
            f"({type(error).__name__}: {' '.join(str(error).split())[:160]}; offline and not cached?); pass "
            "a local copy of wiki.test.raw with "
            f"${ENV_VAR}=path/to/wiki.test.raw or --metadata '{{\"{METADATA_KEY}\": \"path/to/wiki.test.raw\"}}'."
        ) from error
