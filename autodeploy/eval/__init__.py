"""The accuracy tier: perplexity through ``prompt_logprobs``, comparison with HF transformers on
the same weights, and an lm-evaluation-harness model class (the ``eval`` extra).

- ``python -m autodeploy.eval perplexity|compare-hf ...`` (``__main__.py``);
- ``perplexity.py``: strided-window perplexity, ours and HF's on the same windows;
- ``compare_hf.py``: greedy tokens and log-probabilities against HF;
- ``reference.py``: HF transformers on the weights a built ``LLM`` loaded;
- ``harness.py``: ``AutoDeployLM``, lm-eval's ``"autodeploy"`` model (needs ``lm-eval``).
"""
