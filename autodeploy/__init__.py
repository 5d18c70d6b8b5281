"""autodeploy: deploy any HuggingFace causal LM for fast inference.

    from autodeploy import LLM, SamplingParams
    llm = LLM(model="tiny_llama", max_batch_size=4)
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0))
"""

__version__ = "0.1.0"
__all__ = ["LLM", "Logprob", "RequestOutput", "SamplingParams", "__version__"]


def __getattr__(name):
    # lazy: `import autodeploy` stays cheap (no torch/transformers import) for the CLI's --help
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "SamplingParams":
        from .runtime.sampling_params import SamplingParams

        return SamplingParams
    if name in ("Logprob", "RequestOutput"):
        from .runtime import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'autodeploy' has no attribute {name!r}")
