"""The suite's deprecation guard itself: a deprecation notice, raised or logged by transformers, fails a test."""

import warnings

import pytest


def test_deprecation_warnings_are_errors():
    with pytest.raises(DeprecationWarning):
        warnings.warn("old name", DeprecationWarning)
    with pytest.raises(FutureWarning):
        warnings.warn("old name", FutureWarning)


def test_logged_transformers_deprecation_is_recorded(model, config):
    """transformers 5.24 logs "`past_key_values` ... deprecated" (no DeprecationWarning) when old names are used; the
    recorder that fails tests on such notices sees it, and a forward through the current name logs nothing."""
    import conftest
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers.utils.generic").warning("`past_key_values` is deprecated. Use `cache`.")
    assert any("deprecated" in message for message in conftest._DEPRECATION_LOG.messages)
    conftest._DEPRECATION_LOG.messages.clear()  # this test's notice is deliberate
    out = model(torch.randint(0, config.vocab_size, (1, 4)), use_cache=True)
    assert out.cache is not None
