"""Errors a user can act on. Each carries a one-line message and a hint; the CLI prints both."""


class GlmMlxError(Exception):
    """Base class: `str(err)` is the one-line message, `err.hint` what to do about it."""

    hint: str = ""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class ConfigError(GlmMlxError):
    """A config.json the model cannot honour (wrong model_type, unsupported value)."""

    hint = "Check the checkpoint's config.json; glm-mlx runs model_type 'glm_moe_dsa' (GLM-5.x)."


class CheckpointError(GlmMlxError):
    """Missing, partial or corrupt weights: missing/unexpected tensors, bad shapes, unreadable shards."""

    hint = "Re-download the checkpoint (glm-mlx download REPO) or re-run the conversion."
