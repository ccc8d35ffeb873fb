"""Thought-conditioned generation for LTMs: settle the latents, then hand over to `GenerationMixin.generate`.

Imports only torch, transformers and siblings (copied next to the weights for `trust_remote_code=True`).
"""

from transformers.generation import GenerationMixin


class LTMGenerationMixin(GenerationMixin):
    """`generate()` for [`LTMForCausalLM`]. (Work in progress: see issue "generate()".)"""
