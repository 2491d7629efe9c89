"""glm-mlx: GLM-5.1 (glm_moe_dsa) on Apple Silicon with MLX.

    from glm_mlx import load
    model, tokenizer = load("path/to/checkpoint")
    logits = model(mx.array([[1, 2, 3]]), cache=model.make_cache())
"""

def _fit_mlx_lm_file_limit():
    """mlx_lm.utils runs `resource.setrlimit(RLIMIT_NOFILE, (2048, 4096))` at import, for models of many
    weight files. Under a lower hard limit (`ulimit -n 256` sets both) that raises ValueError and no
    glm-mlx command could start (the model code imports mlx_lm); under a higher one it lowers the limit
    for the whole process (a server with many connections). So that one call, coming from mlx_lm, gets
    what it wants within what the process may have: the soft limit raised towards 2048 as far as the hard
    limit allows, neither limit ever lowered. Every other setrlimit call is passed through untouched."""
    try:
        import resource
    except ImportError:  # Windows: no rlimits, and mlx-lm does not call it there either
        return
    if getattr(resource.setrlimit, "_glm_mlx", False):
        return
    original = resource.setrlimit
    inf = resource.RLIM_INFINITY

    def above(a, b):  # a > b, RLIM_INFINITY being the largest
        return a != b and (a == inf or (b != inf and a > b))

    def setrlimit(which, limits):
        import sys

        caller = sys._getframe(1).f_globals.get("__name__", "")
        if which != resource.RLIMIT_NOFILE or not caller.startswith("mlx_lm"):
            return original(which, limits)
        soft, hard = resource.getrlimit(which)
        want = limits[0]
        if above(want, hard):
            want = hard
        if above(want, soft):
            original(which, (want, hard))

    setrlimit._glm_mlx = True
    resource.setrlimit = setrlimit


_fit_mlx_lm_file_limit()  # before any glm_mlx module imports mlx_lm

from .model.config import ModelArgs  # noqa: E402
from .errors import CheckpointError, ConfigError, GlmMlxError  # noqa: E402


_LAZY = {"load": "model.loading", "load_model": "model.loading", "generate": "generation.text",
         "stream_generate": "generation.text", "encode_prompt": "generation.text", "Engine": "generation.engine",
         "PromptCache": "generation.prompt_cache", "SamplingParams": "generation.sampling",
         "Model": "model.glm_moe_dsa"}


def __getattr__(name):
    # Lazy so `import glm_mlx` (and the CLI's start-up) does not pull in MLX until needed.
    if name not in _LAZY:
        raise AttributeError(name)
    import importlib

    value = getattr(importlib.import_module(f"glm_mlx.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


__all__ = ["ModelArgs", "Model", "load", "load_model", "generate", "stream_generate", "Engine", "PromptCache",
           "SamplingParams", "GlmMlxError", "ConfigError", "CheckpointError"]
