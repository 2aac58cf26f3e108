"""Reading and splicing the residual stream: outputs unchanged, hooks never leak."""
import pytest
import torch

from workers.engine.errors import EngineError
from workers.engine.hooks import (VisionTail, capture_residual, has_hooks, resolve_layer, select_tokens,
                                  spliced_sae)
from workers.engine.sae import TopKSAE, init_from_sample


def _sae_for(model, images, layer, token, n_latents=40, k=5):
    with capture_residual(model.visual, layer) as store, torch.no_grad():
        model.encode_image(images)
    selected = select_tokens(store["h"], token).reshape(-1, store["h"].shape[-1])
    sae = TopKSAE(selected.shape[-1], n_latents, k)
    init_from_sample(sae, selected, seed=0)
    return sae.requires_grad_(False)


@pytest.mark.parametrize("layer", [-1, -2, 0])
@pytest.mark.parametrize("token", ["cls", "spatial"])
def test_spliced_outputs_equal_plain_outputs_bit_for_bit(tiny, images, layer, token):
    model = tiny.model
    sae = _sae_for(model, images, layer, token)
    with torch.no_grad():
        plain = model.encode_image(images)
        with spliced_sae(model.visual, layer, sae, token) as store:
            spliced = model.encode_image(images)
    assert torch.equal(plain, spliced)
    assert store["latents"].shape[-1] == 40
    # the SAE really was in the path: its reconstruction differs from the stream it replaced
    assert (store["latents"] > 0).any()


def test_spliced_latents_receive_gradients(tiny, images):
    model = tiny.model
    sae = _sae_for(model, images, -2, "cls")
    with spliced_sae(model.visual, -2, sae, "cls", latents_require_grad=True) as store:
        out = model.encode_image(images).sum()
    grad = torch.autograd.grad(out, store["latents"])[0]
    assert grad.abs().sum() > 0


def test_hooks_are_removed_on_exit(tiny, images):
    model = tiny.model
    sae = _sae_for(model, images, -1, "cls")
    with capture_residual(model.visual, -1):
        assert has_hooks(model)
    assert not has_hooks(model)
    with spliced_sae(model.visual, -1, sae):
        assert has_hooks(model)
    assert not has_hooks(model)


def test_hooks_are_removed_when_the_call_raised(tiny, images):
    model = tiny.model
    sae = _sae_for(model, images, -1, "cls")
    with pytest.raises(RuntimeError):
        with spliced_sae(model.visual, -1, sae):
            model.encode_image(images[:, :2])  # two channels: the patch embedding raises
    assert not has_hooks(model)
    with pytest.raises(ZeroDivisionError):
        with capture_residual(model.visual, 0):
            1 / 0
    assert not has_hooks(model)


@pytest.mark.parametrize("layer", [-1, -2, -3])
def test_the_tail_recomputes_the_image_embedding_from_the_cached_stream(tiny, images, layer):
    model = tiny.model
    with capture_residual(model.visual, layer) as store, torch.no_grad():
        expected = model.encode_image(images)
        tail = VisionTail(model.visual, layer, "cls")
        got = tail(store["h"])
    assert torch.allclose(got, expected, atol=1e-5)
    assert tail.cls_only == (layer == -1)


def test_layers_out_of_range_are_refused_with_the_valid_range(tiny):
    assert resolve_layer(tiny.model.visual, -1) == 2
    assert resolve_layer(tiny.model.visual, 0) == 0
    with pytest.raises(EngineError, match=r"layer 3 does not exist: the vision transformer has 3 blocks"):
        resolve_layer(tiny.model.visual, 3)
    with pytest.raises(EngineError, match="-1..-3"):
        resolve_layer(tiny.model.visual, -4)
