"""lm-eval's own WikiText detokenizer and metric inputs (`lm_eval/tasks/wikitext/preprocess_wikitext.py`),
re-exported so the local task scores exactly like the Hub one: words and bytes are counted on the raw page."""

from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer


__all__ = ["process_results", "wikitext_detokenizer"]
