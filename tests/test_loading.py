"""Loading: configs, sharded and MLX-quantized checkpoints, and one-line errors for bad input."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from reference import make_reference, tiny_config, write_tokenizer
from safetensors.torch import load_file, save_file

from glm_mlx import CheckpointError, ConfigError, ModelArgs, load_model

GLM51 = json.loads((__import__("pathlib").Path(__file__).parents[1] / "glm_mlx/data/glm-5.1-config.json").read_text())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    make_reference(path, seed=0)
    write_tokenizer(path)
    return path


def copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_glm51_config_is_understood():
    args = ModelArgs.from_dict({**GLM51, "some_future_key": 1})
    assert args.indexer_types == ["full"] * 78
    assert args.mlp_layer_types[:4] == ["dense", "dense", "dense", "sparse"]
    assert args.rope_parameters["rope_theta"] == 1000000 and args.eos_token_ids == [154820, 154827, 154829]
    assert args.extra["some_future_key"] == 1


def test_glm52_indexer_schedule_matches_reference():
    # GLM-5.2: index_topk_freq 4, offset 3 -> the same per-layer types as transformers derives.
    ref = tiny_config(num_hidden_layers=12, index_topk_freq=4, index_skip_topk_offset=3)
    args = ModelArgs.from_dict({**GLM51, "num_hidden_layers": 12, "index_topk_freq": 4, "index_skip_topk_offset": 3})
    assert args.indexer_types == ref.indexer_types
    assert ModelArgs.from_dict({**GLM51, "num_hidden_layers": 4, "index_topk_pattern": "FSSF"}).indexer_types == \
        ["full", "shared", "shared", "full"]


def test_legacy_rope_keys():
    cfg = {k: v for k, v in GLM51.items() if k != "rope_parameters"}
    args = ModelArgs.from_dict({**cfg, "rope_theta": 8000000, "rope_scaling": None})
    assert args.rope_parameters == {"rope_theta": 8000000, "rope_type": "default"}


@pytest.mark.parametrize("key,value,needle", [
    ("model_type", "llama", "model_type"),
    ("n_group", 3, "n_group"),
    ("topk_group", 5, "topk_group"),
    ("scoring_func", "softmax", "scoring_func"),
    ("rope_parameters", {"rope_theta": 1e6, "rope_type": "mrope"}, "rope_type"),
    ("index_topk_pattern", "FXS", "index_topk_pattern"),
    ("num_nextn_predict_layers", 3, "num_nextn_predict_layers"),
])
def test_bad_config_names_key(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelArgs.from_dict({**GLM51, key: value})


def test_wrong_model_type_folder(ckpt, tmp_path):
    path = copy(ckpt, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "deepseek_v3"}))
    with pytest.raises(ConfigError, match="model_type is 'deepseek_v3'"):
        load_model(path)


def test_missing_folder_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(tmp_path)


def _rewrite(path, fn):
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_tensors(ckpt, tmp_path):
    path = copy(ckpt, tmp_path)
    _rewrite(path, lambda s: s.pop("model.layers.2.self_attn.o_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.2.self_attn.o_proj.weight"):
        load_model(path)
    shutil.rmtree(path)
    path = copy(ckpt, tmp_path)
    _rewrite(path, lambda s: s.update({"model.layers.0.self_attn.bogus.weight": s["model.norm.weight"].clone()}))
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.self_attn.bogus.weight"):
        load_model(path)
    shutil.rmtree(path)
    path = copy(ckpt, tmp_path)
    _rewrite(path, lambda s: s.update({"model.norm.weight": s["model.norm.weight"][:10].clone()}))
    with pytest.raises(CheckpointError, match="tensor model.norm.weight has shape \\(10,\\)"):
        load_model(path)
    shutil.rmtree(path)
    path = copy(ckpt, tmp_path)
    _rewrite(path, lambda s: s.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.1.mlp.experts.3.up_proj.weight"):
        load_model(path)


def test_sharded_partial_and_corrupt(ckpt, tmp_path):
    """A sharded checkpoint loads; a missing shard and a truncated shard are named."""
    path = copy(ckpt, tmp_path)
    state = load_file(str(path / "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(path / name), metadata={"format": "pt"})
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    toks = mx.array([[5, 6, 7, 8]])
    ref = load_model(ckpt, dtype=mx.float32)
    np.testing.assert_allclose(np.array(load_model(path, dtype=mx.float32)(toks)), np.array(ref(toks)), atol=1e-6)

    second = path / "model-00002-of-00002.safetensors"
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt shard model-00002-of-00002.safetensors"):
        load_model(path)
    second.unlink()
    with pytest.raises(CheckpointError, match="missing shard model-00002-of-00002.safetensors"):
        load_model(path)


def test_load_with_tokenizer(ckpt):
    from glm_mlx import load

    model, tokenizer = load(ckpt)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert tokenizer.decode(ids).startswith("[gMASK]<sop><|user|>")
    assert set(tokenizer.eos_token_ids) == {1, 2}
    assert model(mx.array([ids])).shape == (1, len(ids), 96)


def test_mlx_quantized_checkpoint(ckpt, tmp_path):
    """An MLX conversion made by mlx-lm (config['quantization'] + per-module overrides) loads as is."""
    from mlx_lm.convert import convert
    from mlx_lm.utils import load_model as mlx_lm_load_model

    cfg = json.loads((ckpt / "config.json").read_text())
    src = copy(ckpt, tmp_path)
    (src / "config.json").write_text(json.dumps({**cfg, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
                                                "moe_layer_freq": 1}))
    out = tmp_path / "mlx4"
    convert(str(src), mlx_path=str(out), quantize=True, q_group_size=32, q_bits=4)
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant["bits"] == 4
    theirs, _ = mlx_lm_load_model(out)
    ours = load_model(out)
    assert ours.model.layers[1].mlp.switch_mlp.gate_proj.__class__.__name__ == "QuantizedSwitchLinear"
    toks = mx.array([[5, 6, 7, 8, 9, 10, 11]])
    np.testing.assert_allclose(np.array(ours(toks)), np.array(theirs(toks)), atol=2e-2)
