"""glm-mlx: GLM-5.1 (glm_moe_dsa) on Apple Silicon with MLX.

    from glm_mlx import load
    model, tokenizer = load("path/to/checkpoint")
    logits = model(mx.array([[1, 2, 3]]), cache=model.make_cache())
"""

from .config import ModelArgs
from .errors import CheckpointError, ConfigError, GlmMlxError


_LAZY = {"load": "loading", "load_model": "loading", "generate": "generate", "stream_generate": "generate",
         "encode_prompt": "generate", "Engine": "engine", "PromptCache": "prompt_cache", "SamplingParams": "sampling",
         "Model": "model"}


def __getattr__(name):
    # Lazy so `import glm_mlx` (and the CLI's start-up) does not pull in MLX until needed.
    if name not in _LAZY:
        raise AttributeError(name)
    import importlib

    value = getattr(importlib.import_module(f"glm_mlx.{_LAZY[name]}"), name)
    globals()[name] = value  # also replaces the submodule attribute `generate` with the function
    return value


__all__ = ["ModelArgs", "Model", "load", "load_model", "generate", "stream_generate", "Engine", "PromptCache",
           "SamplingParams", "GlmMlxError", "ConfigError", "CheckpointError"]
