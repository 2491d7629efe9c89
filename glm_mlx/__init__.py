"""glm-mlx: GLM-5.1 (glm_moe_dsa) on Apple Silicon with MLX.

    from glm_mlx import load
    model, tokenizer = load("path/to/checkpoint")
    logits = model(mx.array([[1, 2, 3]]), cache=model.make_cache())
"""

from .config import ModelArgs
from .errors import CheckpointError, ConfigError, GlmMlxError


def __getattr__(name):
    # Lazy so `import glm_mlx` (and the CLI's start-up) does not pull in MLX until needed.
    if name in ("load", "load_model"):
        from . import loading

        return getattr(loading, name)
    if name in ("generate", "stream_generate", "encode_prompt"):
        from . import generate as gen

        return getattr(gen, name)
    if name in ("Engine", "PromptCache", "SamplingParams"):
        from . import engine, prompt_cache, sampling

        return getattr(engine, name, None) or getattr(prompt_cache, name, None) or getattr(sampling, name)
    if name == "Model":
        from .model import Model

        return Model
    raise AttributeError(name)


__all__ = ["ModelArgs", "Model", "load", "load_model", "generate", "stream_generate", "Engine", "PromptCache",
           "SamplingParams", "GlmMlxError", "ConfigError", "CheckpointError"]
