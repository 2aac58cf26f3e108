"""Loading models, checkpoints and probes: weights round-trip, nothing in a file ever runs, errors say why."""
import copy
import json
import logging
import os
import pickle
import socket

import numpy as np
import open_clip
import pytest
import torch
from safetensors.numpy import save_file as save_numpy_safetensors
from safetensors.torch import save_file

import workers.engine.hub as hub
import workers.engine.loading as loading
from workers.engine.data import TensorImages
from workers.engine.errors import EngineError
from workers.engine.heads import LinearProbe
from workers.engine.hooks import VisionTail, capture_residual, check_token_reaches_output
from workers.engine.hub import is_offline
from workers.engine.loading import load_clip
from workers.engine.model_config import register_model_config, size_model_config
from workers.engine.pipeline import run_audit
from workers.engine.tiny import TINY_VIT, tiny_clip, tiny_config

from .conftest import build_audit_config

EMBED = TINY_VIT["embed_dim"]


def _tensors_only(model):
    """open_clip state dicts share storage between some tensors; safetensors wants each on its own."""
    return {k: v.contiguous().clone() for k, v in model.state_dict().items()}


def _assert_same_model(a, b, images):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a.model.encode_image(images), b.model.encode_image(images))


class _WritesAFile:
    """Unpickling this runs a shell command that creates ``target``."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return os.system, (f"touch '{self.target}'",)


def _never_called(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} was called with {args} {kwargs}")
    return fail


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_probe(n_classes=3, dim=16, normalization="l2", **overrides):
    gen = torch.Generator().manual_seed(5)
    kwargs = dict(weight=torch.randn(n_classes, dim, generator=gen), bias=torch.randn(n_classes, generator=gen),
                  class_names=[f"class {i}" for i in range(n_classes)], normalization=normalization,
                  mean=0.1 * torch.randn(dim, generator=gen), scale=0.5 + torch.rand(dim, generator=gen))
    kwargs.update(overrides)
    return LinearProbe(**kwargs)


# --------------------------------------------------------------------------- model checkpoints

def test_a_safetensors_checkpoint_round_trips_every_weight(tiny, images, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(_tensors_only(tiny.model), str(path))

    loaded = load_clip(model_config=TINY_VIT, checkpoint=path)

    assert loaded.name == tiny.name
    _assert_same_model(tiny, loaded, images)


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix"])
def test_a_torch_saved_state_dict_loads(tiny, images, tmp_path, wrap):
    state = _tensors_only(tiny.model)
    if wrap == "state_dict":
        state = {"state_dict": state, "epoch": 3}
    elif wrap == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "tiny.pt"
    torch.save(state, path)

    loaded = load_clip(model_config=TINY_VIT, checkpoint=str(path))

    _assert_same_model(tiny, loaded, images)


def test_it_rejects_a_pickle_checkpoint_without_running_it(tiny, tmp_path):
    pwned = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({**_tensors_only(tiny.model), "payload": _WritesAFile(pwned)}, path)

    with pytest.raises(EngineError, match="pickle") as err:
        load_clip(model_config=TINY_VIT, checkpoint=path)

    assert "refused" in err.value.message
    assert "safetensors" in err.value.message  # says how to save it instead
    assert err.value.permanent
    assert not pwned.exists()


def test_a_checkpoint_of_another_width_names_the_mismatching_tensors(tmp_path):
    wide = load_clip(model_config=tiny_config(width=64), allow_random=True)
    path = tmp_path / "wide.safetensors"
    save_file(_tensors_only(wide.model), str(path))

    with pytest.raises(EngineError, match="shape mismatch") as err:
        load_clip(model_config=TINY_VIT, checkpoint=path)

    assert "visual.conv1.weight (checkpoint [64, 3, 8, 8], model [48, 3, 8, 8])" in err.value.message


def test_a_checkpoint_with_missing_tensors_says_which(tiny, tmp_path):
    state = _tensors_only(tiny.model)
    del state["visual.proj"]
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))

    with pytest.raises(EngineError, match="missing from the checkpoint: visual.proj"):
        load_clip(model_config=TINY_VIT, checkpoint=path)


def test_it_rejects_an_unsupported_checkpoint_suffix(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("not weights")

    with pytest.raises(EngineError, match="unsupported type '.txt'") as err:
        load_clip(model_config=TINY_VIT, checkpoint=path)

    assert ".safetensors" in err.value.message


@pytest.mark.parametrize("content", [b"", b"garbage, not a safetensors header", b"\x08" + bytes(7) + b"{\"a\":1}"])
def test_it_rejects_a_corrupt_safetensors_checkpoint(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)

    with pytest.raises(EngineError, match="broken.safetensors is not a readable safetensors file"):
        load_clip(model_config=TINY_VIT, checkpoint=path)


def test_it_rejects_a_truncated_safetensors_checkpoint(tiny, tmp_path):
    path = tmp_path / "truncated.safetensors"
    save_file(_tensors_only(tiny.model), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(EngineError, match="not a readable safetensors file"):
        load_clip(model_config=TINY_VIT, checkpoint=path)


def test_it_reports_a_checkpoint_file_that_does_not_exist(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        load_clip(model_config=TINY_VIT, checkpoint=tmp_path / "nowhere.safetensors")


# --------------------------------------------------------------------------- pretrained tags

def test_an_uncached_pretrained_tag_fails_fast_when_hf_is_switched_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(open_clip, "download_pretrained", _never_called("open_clip.download_pretrained"))
    monkeypatch.setattr(hub.socket, "create_connection", _never_called("socket.create_connection"))

    assert is_offline()
    with pytest.raises(EngineError, match="offline") as err:
        load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))

    assert "ViT-B-32 / laion2b_s34b_b79k" in err.value.message
    assert "checkpoint" in err.value.message  # points at the way out: register a checkpoint file
    assert err.value.permanent


def test_an_uncached_pretrained_tag_fails_when_hf_cannot_be_reached(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    closed = ("127.0.0.1", _closed_port())
    monkeypatch.setattr(hub, "_OFFLINE_PROBE_HOST", closed)
    monkeypatch.setattr(open_clip, "download_pretrained", _never_called("open_clip.download_pretrained"))
    contacted = []
    real_connect = socket.create_connection

    def recording_connect(address, *args, **kwargs):
        contacted.append(tuple(address))
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(hub.socket, "create_connection", recording_connect)

    assert is_offline()
    with pytest.raises(EngineError, match="offline") as err:
        load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))

    assert "checkpoint" in err.value.message
    assert contacted and set(contacted) == {closed}


def test_an_unknown_tag_lists_the_known_tags(monkeypatch):
    monkeypatch.setattr(open_clip, "download_pretrained", _never_called("open_clip.download_pretrained"))

    with pytest.raises(EngineError, match="'no-such-tag' is not a pretrained tag of ViT-B-32") as err:
        load_clip("ViT-B-32", pretrained="no-such-tag")

    assert "laion2b_s34b_b79k" in err.value.message
    assert "openai" in err.value.message


def test_an_unknown_architecture_is_refused():
    with pytest.raises(EngineError, match="unknown OpenCLIP architecture 'ViT-Nonexistent-7'"):
        load_clip("ViT-Nonexistent-7", allow_random=True)


def test_a_model_without_weights_is_refused_unless_random_is_allowed(tmp_path):
    with pytest.raises(EngineError, match="needs weights"):
        load_clip(model_config=TINY_VIT)

    assert load_clip(model_config=TINY_VIT, allow_random=True).embed_dim == EMBED


def test_naming_both_an_architecture_and_a_model_config_is_refused():
    with pytest.raises(EngineError, match="either an architecture name or a model config, not both"):
        load_clip("ViT-B-32", model_config=TINY_VIT, allow_random=True)


def test_naming_neither_an_architecture_nor_a_model_config_is_refused():
    with pytest.raises(EngineError, match="needs an architecture name or a model config"):
        load_clip(allow_random=True)


def test_naming_both_a_tag_and_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(EngineError, match="either a pretrained tag or a checkpoint file, not both"):
        load_clip("ViT-B-32", pretrained="laion2b_s34b_b79k", checkpoint=tmp_path / "w.safetensors")


def test_a_custom_config_with_a_pretrained_tag_is_refused():
    with pytest.raises(EngineError, match="custom config needs a checkpoint file"):
        load_clip(model_config=TINY_VIT, pretrained="laion2b_s34b_b79k")


# --------------------------------------------------------------------------- model configs

def test_the_same_config_always_gets_the_same_name(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY_VIT, indent=2))

    first = register_model_config(TINY_VIT)

    assert register_model_config(tiny_config()) == first
    assert register_model_config(path) == first  # from JSON, keys in another layout
    assert first.startswith("custom-") and first in open_clip.list_models()
    assert register_model_config(tiny_config(width=64)) != first


def test_a_config_without_embed_dim_is_refused():
    config = tiny_config()
    del config["embed_dim"]

    with pytest.raises(EngineError, match="lacks embed_dim"):
        register_model_config(config)


def test_a_config_with_a_timm_tower_is_refused():
    config = tiny_config(timm_model_name="vit_tiny_patch16_224")

    with pytest.raises(EngineError, match="timm") as err:
        register_model_config(config)

    assert "VisionTransformer" in err.value.message


def test_a_config_with_a_resnet_tower_is_refused():
    config = tiny_config(layers=[1, 1, 1, 1])

    with pytest.raises(EngineError, match="ResNet"):
        register_model_config(config)


def test_an_unreadable_config_file_is_refused(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")

    with pytest.raises(EngineError, match="broken.json is not readable JSON"):
        register_model_config(path)


def _text_variant(**text) -> dict:
    config = copy.deepcopy(TINY_VIT)
    config["text_cfg"].update(text)
    return config


@pytest.mark.parametrize("config", [
    TINY_VIT,
    tiny_config(pool_type="avg", ls_init_value=0.1, no_ln_pre=True, image_size=[32, 48], patch_size=[8, 16]),
    {**_text_variant(embed_cls=True, proj_bias=True, no_causal_mask=True, mlp_ratio=3.0), "init_logit_bias": -10.0},
    _text_variant(embed_cls=True),
    {**_text_variant(embed_cls=True), "custom_text": True},
], ids=["tiny", "average-pooled", "text-variants", "text-cls-embedding", "custom-text"])
def test_the_parameter_count_from_a_config_is_the_built_models(config):
    size = size_model_config(config)

    model = load_clip(model_config=config, allow_random=True).model

    assert size.parameters == sum(p.numel() for p in model.parameters())
    assert size.buffers == sum(b.numel() for b in model.buffers())
    assert size.float32_bytes == 4 * (size.parameters + size.buffers)


def test_a_config_value_of_the_wrong_type_is_refused_by_the_engine_naming_it():
    with pytest.raises(EngineError) as err:
        register_model_config(tiny_config(width="48"))

    assert err.value.message == 'model config: vision_cfg.width must be a whole number of at least 1, got "48"'


def test_a_checkpoint_far_smaller_than_its_config_is_refused_before_the_model_is_built(tiny, tmp_path, monkeypatch):
    path = tmp_path / "tiny.safetensors"
    save_file(_tensors_only(tiny.model), str(path))
    built = []
    monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda name, **kw: built.append(name))

    with pytest.raises(EngineError, match="tiny.safetensors holds 1,664,049 weights but custom-[0-9a-f]{12} has "
                                          "204,095,457 parameters, so it was not saved from this model"):
        load_clip(model_config=tiny_config(width=1024, layers=24, head_width=64, image_size=224, patch_size=14),
                  checkpoint=path)

    assert built == []


def test_open_clips_random_init_warning_is_dropped_when_a_checkpoint_follows(tiny, tmp_path, caplog):
    path = tmp_path / "tiny.safetensors"
    save_file(_tensors_only(tiny.model), str(path))

    with caplog.at_level(logging.INFO):
        loaded = load_clip(model_config=TINY_VIT, checkpoint=path)

    assert "initialized randomly" not in caplog.text
    assert f"{loaded.name}: weights loaded from tiny.safetensors" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        load_clip(model_config=TINY_VIT, allow_random=True)
    assert "initialized randomly" in caplog.text  # true there, so still said
    assert not any(isinstance(f, loading._DropNotice) for f in logging.getLogger().filters)


# --------------------------------------------------------------------------- tokens the pooling drops

@pytest.mark.parametrize("pool_type,dropped,kept", [("tok", "spatial", "cls"), ("avg", "cls", "spatial")])
def test_the_last_blocks_tokens_the_pooling_drops_have_zero_gradient_and_are_refused(images, pool_type, dropped,
                                                                                    kept):
    visual = tiny_clip(0, config=tiny_config(pool_type=pool_type)).model.visual
    with capture_residual(visual, -1) as store, torch.no_grad():
        visual(images)
    h = store["h"].clone().requires_grad_(True)  # [batch, tokens, d]
    VisionTail(visual, -1, "spatial").forward(h).pow(2).sum().backward()
    dropped_grad = h.grad[:, 1:] if dropped == "spatial" else h.grad[:, 0]
    kept_grad = h.grad[:, 0] if dropped == "spatial" else h.grad[:, 1:]
    assert dropped_grad.abs().max() == 0 and kept_grad.abs().max() > 0  # the premise, by construction

    with pytest.raises(EngineError) as err:
        check_token_reaches_output(visual, -1, dropped)

    assert err.value.message.startswith(f"layer -1 with token '{dropped}': the last block's ")
    assert err.value.message.endswith(f"so every relevance would be zero and the audit could flag nothing; pick "
                                      f"layer -2 or token {kept}")
    check_token_reaches_output(visual, -1, kept)
    check_token_reaches_output(visual, -2, dropped)


def test_run_audit_refuses_a_token_the_pooling_drops_before_any_work(tiny, tmp_path):
    classes = ["nevus", "melanoma"]
    dataset = TensorImages(torch.randn(8, 3, 32, 32), torch.tensor([0, 1] * 4), classes)
    probe = LinearProbe(torch.randn(1, EMBED), torch.zeros(1), classes)

    with pytest.raises(EngineError, match="pick layer -2 or token cls"):
        run_audit(build_audit_config(layer=-1, token="spatial"), tiny, probe, dataset, workdir=tmp_path)

    assert list(tmp_path.iterdir()) == []  # no activation was extracted, no SAE trained


# --------------------------------------------------------------------------- probes

@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("normalization", ["l2", "none"])
def test_a_probe_round_trips_through_its_file(tmp_path, suffix, normalization):
    probe = build_probe(normalization=normalization)
    path = tmp_path / f"probe{suffix}"
    probe.save(path)

    loaded = LinearProbe.load(path)

    assert loaded.class_names == probe.class_names
    assert loaded.normalization == normalization
    for name in ("weight", "bias", "mean", "scale"):
        assert torch.equal(getattr(loaded, name), getattr(probe, name)), name
    f = torch.randn(5, 16)
    assert torch.equal(loaded(f), probe(f))


def test_a_probe_reads_scikit_learn_array_names_and_given_class_names(tmp_path):
    coef, intercept = np.random.randn(3, 16), np.random.randn(3)
    path = tmp_path / "sklearn.npz"
    np.savez(path, coef=coef, intercept=intercept)

    probe = LinearProbe.load(path, class_names=["cat", "dog", "bird"], normalization="none")

    assert probe.class_names == ["cat", "dog", "bird"]
    f = torch.randn(4, 16, dtype=torch.float64)
    expected = f @ torch.as_tensor(coef, dtype=torch.float32).double().T + torch.as_tensor(intercept, dtype=torch.float32).double()
    torch.testing.assert_close(probe(f), expected)


def test_a_binary_probe_scores_minus_s_and_plus_s(tmp_path):
    w, b = np.random.randn(1, 16), np.array([0.3])
    path = tmp_path / "binary.npz"
    np.savez(path, weight=w, bias=b, classes=np.array(["no", "yes"]), normalization=np.array("none"))

    probe = LinearProbe.load(path)

    f = torch.randn(20, 16)
    s = f @ torch.as_tensor(w, dtype=torch.float32).T[:, 0] + torch.as_tensor(b, dtype=torch.float32)
    scores = probe(f)
    assert scores.shape == (20, 2)
    torch.testing.assert_close(scores[:, 1], s)
    torch.testing.assert_close(scores[:, 0], -s)
    assert torch.equal(scores.argmax(1), (s > 0).long())
    assert (s > 0).any() and (s < 0).any()  # both predictions occur


def test_it_rejects_a_probe_holding_python_objects_without_unpickling_them(tmp_path):
    pwned = tmp_path / "pwned"
    path = tmp_path / "probe.npz"
    np.savez(path, weight=np.ones((2, 16)), bias=np.zeros(2),
             classes=np.array([{"a": 1}, _WritesAFile(pwned)], dtype=object))

    with pytest.raises(EngineError, match="Python objects") as err:
        LinearProbe.load(path)

    assert "pickle" in err.value.message
    assert not pwned.exists()


def test_a_probe_of_the_wrong_width_names_both_widths():
    probe = build_probe(dim=16)

    with pytest.raises(EngineError, match="reads 16-dimensional embeddings") as err:
        probe.check_fits(EMBED)

    assert f"produces {EMBED}-dimensional" in err.value.message
    probe.check_fits(16)  # the right width passes


def test_it_rejects_a_probe_with_nan_weights(tmp_path):
    weight = np.ones((2, 16))
    weight[1, 3] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, weight=weight, bias=np.zeros(2), classes=np.array(["a", "b"]))

    with pytest.raises(EngineError, match="probe weight contains NaN or infinite values"):
        LinearProbe.load(path)


def test_it_rejects_a_probe_with_infinite_scale(tmp_path):
    path = tmp_path / "inf.safetensors"
    save_numpy_safetensors({"weight": np.ones((2, 16), np.float32), "bias": np.zeros(2, np.float32),
                            "scale": np.full(16, np.inf, np.float32)}, str(path),
                           metadata={"classes": json.dumps(["a", "b"])})

    with pytest.raises(EngineError, match="probe scale contains NaN or infinite values"):
        LinearProbe.load(path)


def test_it_rejects_a_probe_missing_its_bias(tmp_path):
    path = tmp_path / "nobias.npz"
    np.savez(path, weight=np.ones((2, 16)), classes=np.array(["a", "b"]))

    with pytest.raises(EngineError, match="needs arrays 'weight' \\(or 'coef'\\) and 'bias'") as err:
        LinearProbe.load(path)

    assert "found weight" in err.value.message


def test_it_rejects_a_probe_without_class_names(tmp_path):
    path = tmp_path / "nameless.npz"
    np.savez(path, weight=np.ones((2, 16)), bias=np.zeros(2))

    with pytest.raises(EngineError, match="names no classes"):
        LinearProbe.load(path)


def test_it_rejects_a_probe_whose_rows_and_class_names_disagree(tmp_path):
    path = tmp_path / "probe.npz"
    np.savez(path, weight=np.ones((3, 16)), bias=np.zeros(3), classes=np.array(["a", "b"]))

    with pytest.raises(EngineError, match="3 weight rows but 2 class names"):
        LinearProbe.load(path)


def test_it_rejects_a_pickled_probe(tmp_path):
    pwned = tmp_path / "pwned"
    path = tmp_path / "probe.pkl"
    path.write_bytes(pickle.dumps(_WritesAFile(pwned)))

    with pytest.raises(EngineError, match="only .npz and .safetensors probes are accepted"):
        LinearProbe.load(path)
    with pytest.raises(EngineError, match="saved as .npz or .safetensors"):
        build_probe().save(path)

    assert not pwned.exists()


def test_it_rejects_an_empty_probe_file(tmp_path):
    path = tmp_path / "empty.npz"
    path.write_bytes(b"")

    with pytest.raises(EngineError, match="not a readable .npz file"):
        LinearProbe.load(path)


def test_it_rejects_a_corrupt_safetensors_probe(tmp_path):
    path = tmp_path / "probe.safetensors"
    path.write_bytes(b"garbage")

    with pytest.raises(EngineError, match="probe.safetensors is not a readable safetensors file"):
        LinearProbe.load(path)


# Known gaps in heads.py: these files escape as raw library exceptions instead of an EngineError.
def test_it_rejects_a_truncated_npz_probe(tmp_path):
    path = tmp_path / "probe.npz"
    build_probe().save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(EngineError, match="not a readable .npz file"):
        LinearProbe.load(path)


def test_a_bfloat16_safetensors_probe_is_read_as_float32(tmp_path):
    path = tmp_path / "probe.safetensors"
    save_file({"weight": torch.ones(2, 16, dtype=torch.bfloat16), "bias": torch.zeros(2)}, str(path),
              metadata={"classes": json.dumps(["a", "b"])})

    probe = LinearProbe.load(path)

    assert probe.weight.dtype == torch.float32
    assert torch.equal(probe.weight, torch.ones(2, 16))


def test_it_rejects_safetensors_probe_class_names_that_are_not_json(tmp_path):
    path = tmp_path / "probe.safetensors"
    save_numpy_safetensors({"weight": np.ones((2, 16), np.float32), "bias": np.zeros(2, np.float32)}, str(path),
                           metadata={"classes": "a, b"})

    with pytest.raises(EngineError, match="classes"):
        LinearProbe.load(path)
