"""glm-mini: the small trained glm_moe_dsa reference model that ships inside the package.

GLM-5.1's exact architecture (MLA, DSA indexer, MoE with shared expert and correction-bias
router, one MTP layer) at ~5.6M parameters, trained by scripts/train_reference.py on
Shakespeare + classical Chinese poetry. It is the offline default of `glm-mlx chat` and
`glm-mlx generate`, and the yardstick for quantization quality and MTP acceptance.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL: Path = Path(__file__).resolve().parents[1] / "data" / "glm-mini"


def data_path() -> Path:
    """The folder holding the shipped glm-mini checkpoint (config.json, model.safetensors, tokenizer)."""
    return DEFAULT_MODEL
