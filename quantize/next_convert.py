"""GLM-5.3-Flash (`glm5_next`) in the converter: which checkpoint tensors each output tensor is made from.

One inventory per model: the output tensors are next_inventory's (what the planner prices, as the MLX
model names them); this module only finds their sources. A checkpoint name is first put through the
model's own rename rules (`glm_mlx.model.glm5_next.checkpoint_name`, the naming half of its sanitize:
`model.language_model.` -> `model.`, `hc_attn_fn` -> `attn_hc.fn`, `forget_gate.` dropped; vision
tensors -> None). The structural half of sanitize runs on whole arrays, which the converter never
holds, so the converter streams these mirrors of it instead (tests/test_convert_glm5_next.py checks
that an unquantized conversion is exactly what sanitize makes of the same checkpoint):
  - q/k/v_conv1d [linear_dim, 1, K] each -> conv1d [3 x linear_dim, K, 1] (CONV_PARTS order, axes
    swapped): `conv_weight` here;
  - per-expert `mlp.experts.E.*` -> stacked `switch_mlp.*`, kv_b_proj -> embed_q / unembed_out: GLM-5.1's
    rules (converter.source_names and converter.pieces), as sanitize_glm5_next ends in sanitize_weights;
  - FP8 (`weight_scale_inv` block scales): source.Source.read, row block by row block.
Vision tower tensors are not converted: `NextNames.vision` counts them for the converter's note.
"""

from __future__ import annotations

import mlx.core as mx

from glm_mlx.model.glm5_next import CONV_PARTS, HC_RENAMES, checkpoint_name
from glm_mlx.model.glm5_next_config import Glm5NextArgs

from .output_dir import ConvertError
from .pricing import Tensor

_HF_HC = {v: k for k, v in HC_RENAMES.items()}  # attn_hc.fn -> hc_attn_fn


def hf_name(name: str) -> str:
    """An inventory (MLX) name -> the reference checkpoint's (save_pretrained's) name: the inverse of
    checkpoint_name for that layout. Used when no source is at hand (a plan priced from a config)."""
    head, _, last = name.rpartition(".")
    site = head.rpartition(".")[2] + "." + last
    if site in _HF_HC:
        name = f"{head.rpartition('.')[0]}.{_HF_HC[site]}"
    return "model.language_model." + name[len("model."):] if name.startswith("model.") else name


class NextNames:
    """A glm5_next source's tensor names by the name the model gives them (checkpoint_name)."""

    def __init__(self, weight_map=None):
        self.by_model: dict[str, str] = {}
        self.vision: list[str] = []
        for k in weight_map or ():
            name = checkpoint_name(k)
            if name is None:
                self.vision.append(k)
            elif self.by_model.setdefault(name, k) != k:
                raise ConvertError(f"the checkpoint holds both {self.by_model[name]} and {k}, the same tensor {name}",
                                   "The checkpoint mixes two naming layouts; keep one.")

    def canonical(self, k: str) -> str | None:
        return checkpoint_name(k)

    def source(self, name: str) -> str:
        """The checkpoint's name for a (renamed, pre-stacking) tensor; the reference layout if absent."""
        return self.by_model.get(name) or hf_name(name)

    def sources(self, t: Tensor, generic: list[str]) -> list[str]:
        """`generic`: GLM-5.1's source names for t (experts listed, kv_b_proj) -> this checkpoint's names."""
        if t.name.endswith(".self_attn.conv1d.weight") and t.name not in self.by_model:
            pre = t.name[: -len("conv1d.weight")]
            generic = [f"{pre}{c}.weight" for c in CONV_PARTS]
        return [self.source(n) for n in generic]


def mtp_in_source(args: Glm5NextArgs, weight_map) -> bool:
    prefix = f"model.layers.{args.num_hidden_layers}."
    return bool(args.num_nextn_predict_layers) and any((checkpoint_name(k) or "").startswith(prefix) for k in weight_map)


def conv_weight(source, names: list[str]) -> mx.array:
    """The KDA conv weight in MLX's layout [3 x linear_dim, K, 1] (float32), from q/k/v_conv1d (or a joined
    conv1d) as sanitize_glm5_next builds it: joined in CONV_PARTS order, torch's [C, 1, K] axes swapped."""
    parts = []
    for n in names:
        w = source.read(n)
        parts.append(w.swapaxes(1, 2) if w.ndim == 3 and w.shape[1] == 1 and w.shape[2] != 1 else w)
    return mx.contiguous(mx.concatenate(parts, axis=0))


def vision_note(names: NextNames) -> list[str]:
    if not names.vision:
        return []
    return [f"skipped {len(names.vision)} vision tower tensors ({names.vision[0]}, ...): the MLX model runs the "
            "text path; config.json keeps vision_config"]
