"""The relevance re-run of the vision tower (workers/engine/lrp.py) and the heatmap methods built on it: the
re-run is the model, the rules conserve what they should, the maps have the grid their method and cells say,
and a latent made to read one region of the image points at that region."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from workers.engine.config import HEATMAP_METHODS
from workers.engine.errors import EngineError
from workers.engine.heatmaps import (METHODS, PIXEL_METHODS, cls_relevance, latent_heatmaps, mass_on_mask,
                                     pool_to_cells)
from workers.engine.hooks import capture_residual
from workers.engine.lrp import half_gradient, identity_rule, tower_cls_output, tower_relevance
from workers.engine.sae import TopKSAE, init_from_sample
from workers.engine.tiny import tiny_clip, tiny_config

GRID = (4, 6)


@pytest.fixture
def wide():
    return tiny_clip(0, tiny_config(image_size=[32, 48]))


@pytest.fixture
def pixels():
    return torch.randn(5, 3, 32, 48, generator=torch.Generator().manual_seed(3))


def cls_after(visual, layer, pixels):
    with capture_residual(visual, layer) as store, torch.no_grad():
        visual(pixels)
    return store["h"][:, 0]


def sae_on(cls, n_latents=24, k=4):
    sae = TopKSAE(cls.shape[-1], n_latents, k)
    init_from_sample(sae, cls, seed=0)
    return sae.requires_grad_(False)


@pytest.mark.parametrize("rule", ["attnlrp", "fixed"])
@pytest.mark.parametrize("index", [0, 2])
def test_the_rerun_from_the_pixels_is_the_models_own_cls_token(wide, pixels, rule, index):
    visual = wide.model.visual
    with torch.no_grad():
        assert torch.allclose(tower_cls_output(visual, index, pixels, rule), cls_after(visual, index, pixels),
                              atol=1e-5)


def test_the_rules_change_gradients_not_values():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0], requires_grad=True)
    y = identity_rule(nn.GELU(), x)
    assert torch.allclose(y, nn.GELU()(x))
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(grad * x, y.detach())  # relevance passes through unchanged: x * grad = act(x)
    h = half_gradient(x)
    assert torch.equal(h, x) and torch.allclose(torch.autograd.grad(h.sum(), x)[0], torch.full_like(x, 0.5))


def unbiased(bundle):
    """A copy of the model with every bias, the class token and the positions zeroed: with the attention fixed
    the rules make the tower linear in the pixels, so relevance must add up exactly."""
    visual = copy.deepcopy(bundle.model.visual)
    with torch.no_grad():
        for name, p in visual.named_parameters():
            if name.endswith("bias") or name in ("class_embedding", "positional_embedding"):
                p.zero_()
    return visual


def test_with_fixed_attention_the_pixels_relevance_adds_up_to_the_latents_evidence(wide, pixels):
    visual = unbiased(wide)
    cls = cls_after(visual, 1, pixels)
    sae = sae_on(cls)
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    relevance = tower_relevance(visual, sae, 1, pixels, [0, 5, 9], cls, rule="fixed")
    assert relevance.shape == (5, 3, 32, 48)
    expected = sae.pre_activations(cls)[:, [0, 5, 9]]
    assert torch.allclose(relevance.sum((2, 3)), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("blocks", [1, 2, 3, 9])
def test_traced_back_through_fixed_attention_the_tokens_relevance_adds_up_to_the_latents_evidence(wide, pixels,
                                                                                                  blocks):
    """Through 1, 2 or every block (9 asks for more than the 3 there are: the trace stops at block 0)."""
    visual = unbiased(wide)
    cls = cls_after(visual, 2, pixels)
    sae = sae_on(cls)
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    relevance, _ = cls_relevance(visual, sae, 2, pixels, [0, 5, 9], "fixed", blocks)
    assert relevance.shape == (5, 3, GRID[0] * GRID[1] + 1)
    assert torch.allclose(relevance.sum(-1), sae.pre_activations(cls)[:, [0, 5, 9]], rtol=1e-3, atol=1e-4)


def test_one_block_of_conservative_is_the_block_method_and_blocks_change_the_map(wide, pixels):
    visual = wide.model.visual
    sae = sae_on(cls_after(visual, 2, pixels))
    block = latent_heatmaps(visual, sae, 2, "cls", pixels, [0, 3], method="block", blocks=3)  # "block": always 1
    assert torch.equal(block, latent_heatmaps(visual, sae, 2, "cls", pixels, [0, 3], method="conservative", blocks=1))
    assert not torch.allclose(block, latent_heatmaps(visual, sae, 2, "cls", pixels, [0, 3], method="conservative",
                                                     blocks=2))


def test_the_configs_method_names_are_the_engines():
    assert HEATMAP_METHODS == tuple(METHODS)


def test_with_attnlrp_the_value_path_keeps_half_and_the_scores_the_rest(wide, pixels):
    """AttnLRP's softmax rule drops the softmax's bias term, so it conserves only approximately: the pixels'
    relevance is the latent's evidence to well within its size, unlike plain gradient x input."""
    visual = unbiased(wide)
    cls = cls_after(visual, 1, pixels)
    sae = sae_on(cls)
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    total = tower_relevance(visual, sae, 1, pixels, list(range(24)), cls, rule="attnlrp").sum((2, 3))
    expected = sae.pre_activations(cls)
    assert torch.corrcoef(torch.stack([total.flatten(), expected.flatten()]))[0, 1] > 0.9


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("cells", [1, 2, 8])
def test_each_method_gives_a_map_on_its_grid(wide, pixels, method, cells):
    visual = wide.model.visual
    sae = sae_on(cls_after(visual, 1, pixels))
    maps = latent_heatmaps(visual, sae, 1, "cls", pixels, [0, 3], method=method, cells=cells)
    scale = cells if method in PIXEL_METHODS else 1
    assert maps.shape == (5, 2, GRID[0] * scale, GRID[1] * scale)
    assert (maps >= 0).all() and maps.sum() > 0


def test_an_unknown_method_or_a_cell_count_out_of_range_is_refused_by_name(wide, pixels):
    visual = wide.model.visual
    sae = sae_on(cls_after(visual, 1, pixels))
    with pytest.raises(EngineError, match="method must be one of attnlrp, conservative, block, attnlrp-pixels, "
                                          "encoder, occlusion, got 'gradcam'"):
        latent_heatmaps(visual, sae, 1, "cls", pixels, [0], method="gradcam")
    for cells in (0, 17, 2.0, True):
        with pytest.raises(EngineError, match=f"cells per patch side must be a whole number from 1 to 16, got {cells}"):
            latent_heatmaps(visual, sae, 1, "cls", pixels, [0], method="attnlrp", cells=cells)


def test_pooling_into_cells_keeps_every_pixels_relevance_even_where_a_border_cuts_a_pixel():
    relevance = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    even = pool_to_cells(relevance, 8, 12)
    assert torch.allclose(even, relevance.reshape(2, 3, 8, 4, 12, 4).sum((3, 5)), atol=1e-5)
    cut = pool_to_cells(relevance, 12, 18)  # 32 / 12 and 48 / 18 pixels a cell: borders cut pixels
    assert cut.shape == (2, 3, 12, 18)
    assert torch.allclose(cut.sum((2, 3)), relevance.sum((2, 3)), atol=1e-4)
    assert torch.allclose(cut[..., 0, 0], relevance[..., :2, :2].sum((-1, -2)) + relevance[..., 2, :2].sum(-1) * 2 / 3
                          + relevance[..., :2, 2].sum(-1) * 2 / 3 + relevance[..., 2, 2] * 4 / 9, atol=1e-5)


@pytest.mark.parametrize("method", ["attnlrp", "conservative", "block", "attnlrp-pixels"])
def test_a_latent_that_reads_a_bright_square_points_at_it(method):
    """Train nothing: a tiny model sees images whose only content is a bright square at a random place; a
    latent whose encoder is the direction separating images with the square from images without reads the
    square, so its map must put its mass on the square's pixels, far above the square's share of the image.
    (Method "encoder" reads the CLS direction at the patch tokens, which an untrained model's patch tokens do
    not share: it is measured on the case study only.)"""
    bundle = tiny_clip(0, tiny_config(image_size=32))
    visual = bundle.model.visual
    gen = torch.Generator().manual_seed(0)
    n = 64
    pixels = 0.1 * torch.randn(n, 3, 32, 32, generator=gen)
    masks = np.zeros((n, 32, 32), dtype=bool)
    has = torch.arange(n) % 2 == 0
    for i in range(0, n, 2):
        r, c = torch.randint(0, 24, (2,), generator=gen).tolist()
        pixels[i, :, r:r + 8, c:c + 8] += 2.0
        masks[i, r:r + 8, c:c + 8] = True
    cls = cls_after(visual, -1, pixels)
    direction = cls[has].mean(0) - cls[~has].mean(0)
    sae = TopKSAE(cls.shape[-1], 4, 1)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[0] = direction / direction.norm()
        sae.b_pre.copy_(cls[~has].mean(0))
        sae.b_enc.zero_()
    maps = latent_heatmaps(visual, sae.requires_grad_(False), -1, "cls", pixels[has], [0], method=method, cells=2)
    scores = [mass_on_mask(m[0].numpy(), mask) for m, mask in zip(maps, masks[has.numpy()]) if m.sum() > 0]
    assert len(scores) >= n // 4
    mass = np.mean([s[0] for s in scores])
    chance = np.mean([s[1] for s in scores])
    assert mass > 2 * chance
