"""Heatmaps of latents: the spatial SAE's activation per patch, the CLS SAE's gradient x input with fixed attention,
checked against computations written out here; the JSON encoding; the mass a map puts on a mask."""
import numpy as np
import pytest
import torch

from workers.engine.data import TensorImages
from workers.engine.errors import AuditCancelled, EngineError, watched_by
from workers.engine.heatmaps import (cls_relevance, decode_map, encode_map, heatmaps_for, latent_heatmaps,
                                     mass_on_mask)
from workers.engine.hooks import capture_residual, has_hooks, select_tokens
from workers.engine.sae import TopKSAE, init_from_sample
from workers.engine.tiny import tiny_clip, tiny_config

GRID = (4, 6)  # a 32 x 48 image in patches of 8: rows and columns differ, so a transposed map cannot pass


@pytest.fixture
def wide():
    """A tiny OpenCLIP ViT on 32 x 48 images (3 blocks, width 48)."""
    return tiny_clip(0, tiny_config(image_size=[32, 48]))


@pytest.fixture
def pixels():
    return torch.randn(5, 3, 32, 48, generator=torch.Generator().manual_seed(3))


def residual(visual, layer, pixels):
    with capture_residual(visual, layer) as store, torch.no_grad():
        visual(pixels)
    return store["h"]


def sae_for(visual, layer, token, pixels, n_latents=24, k=4):
    selected = select_tokens(residual(visual, layer, pixels), token).reshape(-1, visual.transformer.width)
    sae = TopKSAE(selected.shape[-1], n_latents, k)
    init_from_sample(sae, selected, seed=0)
    return sae.requires_grad_(False)


def block_input(visual, index, pixels):
    """The residual stream entering block ``index``, read with a hook of the test's own."""
    store = {}
    handle = visual.transformer.resblocks[index].register_forward_pre_hook(lambda m, args: store.update(x=args[0]))
    try:
        with torch.no_grad():
            visual(pixels)
    finally:
        handle.remove()
    return store["x"]


@pytest.mark.parametrize("token", ["cls", "spatial"])
def test_there_is_one_map_per_image_and_latent_over_the_patch_grid(wide, pixels, token):
    visual = wide.model.visual
    sae = sae_for(visual, 1, token, pixels)
    maps = latent_heatmaps(visual, sae, 1, token, pixels, [0, 3, 7], batch_size=2)
    assert maps.shape == (5, 3, *GRID) and maps.dtype == torch.float32 and maps.device.type == "cpu"
    assert (maps >= 0).all() and maps.sum() > 0
    assert not has_hooks(visual)


def test_a_spatial_map_is_the_latents_activation_at_each_patch(wide, pixels):
    visual = wide.model.visual
    sae = sae_for(visual, -2, "spatial", pixels)
    latents = [2, 5, 11]
    maps = latent_heatmaps(visual, sae, -2, "spatial", pixels, latents)
    z = sae.encode(residual(visual, -2, pixels)[:, 1:])  # [5, patches, n_latents]
    assert (z[..., latents] > 0).any()
    gh, gw = GRID
    for row in range(gh):
        for col in range(gw):
            patch = row * gw + col  # the patch embedding lays the patches out row by row
            assert torch.allclose(maps[:, :, row, col], z[:, patch, latents], atol=1e-5)


def test_a_cls_map_is_what_attention_moves_from_each_patch_into_the_cls_token(wide, pixels):
    """Without the MLP the latent's pre-activation is linear in the attention's values; with the attention weights
    and LayerNorm scales fixed, gradient x input of patch j is A[0, j] times its value, read by the encoder."""
    visual = wide.model.visual
    block = visual.transformer.resblocks[1]
    with torch.no_grad():
        block.mlp.c_proj.weight.zero_()
        block.mlp.c_proj.bias.zero_()
    sae = sae_for(visual, 1, "cls", pixels)
    x = block_input(visual, 1, pixels)
    y = block.ln_1(x)
    attn = block.attn
    _, weights = attn(y, y, y, need_weights=True, average_attn_weights=False)  # [b, heads, tokens, tokens]
    d, heads = x.shape[-1], attn.num_heads
    values = (y - block.ln_1.bias) @ attn.in_proj_weight[2 * d:].T  # the values without any bias: [b, tokens, d]
    values = values.reshape(*values.shape[:2], heads, d // heads)
    moved = torch.einsum("bht,bthe->bthe", weights[:, :, 0], values).reshape(*values.shape[:2], d)
    read = sae.W_enc / sae.input_scale  # [n_latents, d]: the encoder's view of the CLS token
    expected = moved @ attn.out_proj.weight.T @ read.T  # [b, tokens, n_latents]
    expected[:, 0] += x[:, 0] @ read.T  # the CLS token also reaches itself through the residual connection
    latents = list(range(sae.n_latents))
    relevance, active = cls_relevance(visual, sae, 1, pixels, latents)
    assert torch.allclose(relevance.transpose(1, 2), expected, atol=1e-4 * expected.abs().max())
    maps = latent_heatmaps(visual, sae, 1, "cls", pixels, latents, method="block")
    kept = expected[:, 1:].clamp_min(0).transpose(1, 2) * active.unsqueeze(-1)
    assert torch.allclose(maps, kept.reshape(maps.shape), atol=1e-4 * expected.abs().max())
    assert maps.sum() > 0


def test_with_fixed_attention_and_a_linear_mlp_the_cls_map_adds_up_to_what_the_patches_contribute(wide, pixels):
    """Uniform attention (no queries or keys), an identity activation and LayerNorms whose scale hardly moves make
    the block affine in its input, so the signed relevance of the patches sums to the pre-activation's change
    when they are removed from the block's input, measured with the real model."""
    visual = wide.model.visual
    block = visual.transformer.resblocks[1]
    d = visual.transformer.width
    with torch.no_grad():
        block.attn.in_proj_weight[:2 * d].zero_()
        block.attn.in_proj_bias[:2 * d].zero_()
        for ln in (block.ln_1, block.ln_2):  # a scale of sqrt(eps) whatever the input, the output's size kept
            ln.eps = 1e8
            ln.weight.mul_(1e4)
    block.mlp.gelu = torch.nn.Identity()
    sae = sae_for(visual, 1, "cls", pixels)
    latents = list(range(sae.n_latents))
    relevance, _ = cls_relevance(visual, sae, 1, pixels, latents)

    def pre_activation(drop_patches: bool):
        def hook(_module, args):
            x = args[0].clone()
            if drop_patches:
                x[:, 1:] = 0
            return (x,)

        handle = block.register_forward_pre_hook(hook)
        try:
            return sae.pre_activations(residual(visual, 1, pixels)[:, 0])
        finally:
            handle.remove()

    change = pre_activation(False) - pre_activation(True)
    assert change.abs().max() > 1e-3
    assert torch.allclose(relevance[:, :, 1:].sum(-1), change, rtol=1e-3, atol=1e-4 * change.abs().max())


def test_plain_gradient_times_input_at_the_block_input_vanishes_which_is_why_layernorm_scales_are_fixed(
        wide, pixels):
    visual = wide.model.visual
    block = visual.transformer.resblocks[1]
    sae = sae_for(visual, 1, "cls", pixels)
    x = block_input(visual, 1, pixels).clone().requires_grad_(True)
    pre = sae.pre_activations(block(x)[:, 0])[:, 0].sum()
    (grad,) = torch.autograd.grad(pre, x)
    plain = (grad * x).sum(-1)[:, 1:]
    relevance, _ = cls_relevance(visual, sae, 1, pixels, [0])
    assert plain.abs().max() < 1e-3 * relevance[:, 0, 1:].abs().max()


def test_a_latent_the_topk_did_not_select_has_a_map_of_zeros(wide, pixels):
    visual = wide.model.visual
    sae = sae_for(visual, 2, "cls", pixels, n_latents=24, k=2)
    z = sae.encode(residual(visual, 2, pixels)[:, 0])
    maps = latent_heatmaps(visual, sae, 2, "cls", pixels, list(range(24)), method="block")
    relevance, _ = cls_relevance(visual, sae, 2, pixels, list(range(24)))
    inactive = z == 0
    assert inactive.any() and (~inactive).any()
    assert (maps[inactive] == 0).all()
    # where the latent is active its map is the positive part of its relevance, which is not all zero
    assert torch.equal(maps[~inactive] > 0, relevance[:, :, 1:][~inactive].reshape(maps[~inactive].shape) > 0)
    assert maps[~inactive].sum() > 0
    # had the inactive ones been kept, they would have shown something
    assert (relevance[:, :, 1:][inactive] > 0).any()


def test_hooks_are_removed_when_the_model_raises(wide, pixels):
    visual = wide.model.visual
    sae = sae_for(visual, 1, "cls", pixels)
    for token in ("cls", "spatial"):
        with pytest.raises(RuntimeError):
            latent_heatmaps(visual, sae, 1, token, pixels[:, :2], [0])  # two channels: the patch embedding raises
        assert not has_hooks(visual)


def test_a_cls_map_of_a_block_other_than_the_standard_one_is_refused_and_a_spatial_map_is_not():
    bundle = tiny_clip(0, tiny_config(qk_norm=True))
    visual = bundle.model.visual
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with pytest.raises(EngineError, match="standard attention block.*CustomResidualAttentionBlock"):
        latent_heatmaps(visual, sae_for(visual, 1, "cls", images), 1, "cls", images, [0])
    assert latent_heatmaps(visual, sae_for(visual, 1, "spatial", images), 1, "spatial", images, [0]).shape == \
        (2, 1, 4, 4)


def test_a_block_that_computes_something_else_is_refused(wide, pixels):
    visual = wide.model.visual
    sae = sae_for(visual, 1, "cls", pixels)
    block = visual.transformer.resblocks[1]
    original = block.forward
    block.forward = lambda x, attn_mask=None: original(x, attn_mask=attn_mask) * 2
    with pytest.raises(EngineError, match="other than open_clip's standard attention block"):
        latent_heatmaps(visual, sae, 1, "cls", pixels, [0])


@pytest.mark.parametrize("token, latents, message", [
    ("patch", [0], "token must be one of cls, spatial"),
    ("cls", [24], "latent 24 does not exist: the SAE has 24 latents"),
])
def test_bad_requests_are_refused_by_name(wide, pixels, token, latents, message):
    visual = wide.model.visual
    with pytest.raises(EngineError, match=message):
        latent_heatmaps(visual, sae_for(visual, 1, "cls", pixels), 1, token, pixels, latents)


@pytest.mark.parametrize("token", ["cls", "spatial"])
def test_a_residual_stream_that_is_not_the_class_token_and_one_token_per_patch_is_refused(wide, pixels, token):
    visual = wide.model.visual
    sae = sae_for(visual, 1, token, pixels)
    visual.grid_size = (2, 6)
    with pytest.raises(EngineError, match=r"class token followed by one token per patch \(2 x 6 \+ 1 = 13 tokens\), "
                                          r"but the residual stream has 25"):
        latent_heatmaps(visual, sae, 1, token, pixels, [0])
    del visual.grid_size
    with pytest.raises(EngineError, match="no patch grid"):
        latent_heatmaps(visual, sae, 1, token, pixels, [0])


def test_a_caller_in_inference_mode_gets_the_same_cls_maps(wide, pixels):
    visual = wide.model.visual
    sae = sae_for(visual, 1, "cls", pixels)
    maps = latent_heatmaps(visual, sae, 1, "cls", pixels, list(range(24)))
    with torch.inference_mode():
        assert torch.equal(latent_heatmaps(visual, sae, 1, "cls", pixels, list(range(24))), maps)
    assert maps.sum() > 0


def test_no_latents_give_no_maps(wide, pixels):
    visual = wide.model.visual
    assert latent_heatmaps(visual, sae_for(visual, 1, "cls", pixels), 1, "cls", pixels, []).shape == (5, 0, *GRID)


class CountingImages(TensorImages):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: list[int] = []

    def __getitem__(self, i):
        self.reads.append(i)
        return super().__getitem__(i)


@pytest.mark.parametrize("token", ["cls", "spatial"])
def test_heatmaps_for_reads_each_wanted_image_once_and_maps_only_the_wanted_pairs(wide, pixels, token):
    visual = wide.model.visual
    sae = sae_for(visual, 1, token, pixels)
    images = CountingImages(pixels, [0, 1, 0, 1, 0], ["a", "b"])
    wanted = {3: [0, 4, 2], 7: [4, 1], 9: []}
    checkpoints = []

    class Watch:
        def checkpoint(self):
            checkpoints.append(1)

        def reserve(self, nbytes, what):
            pass

    with watched_by(Watch()):
        maps = heatmaps_for(wide, sae, 1, token, images, wanted, batch_size=2)
    assert sorted(images.reads) == [0, 1, 2, 4]
    assert {latent: sorted(per) for latent, per in maps.items()} == {3: [0, 2, 4], 7: [1, 4], 9: []}
    assert len(checkpoints) >= 2  # two batches of two images and one of one
    full = latent_heatmaps(visual, sae, 1, token, pixels, [3, 7]).numpy()
    for j, latent in enumerate([3, 7]):
        for i, grid in maps[latent].items():
            assert grid.dtype == np.float32 and grid.shape == GRID
            np.testing.assert_allclose(grid, full[i, j], rtol=1e-5, atol=1e-6)


def test_heatmaps_for_stops_when_the_audit_is_cancelled(wide, pixels):
    sae = sae_for(wide.model.visual, 1, "cls", pixels)

    class Cancel:
        def checkpoint(self):
            raise AuditCancelled()

        def reserve(self, nbytes, what):
            pass

    with watched_by(Cancel()), pytest.raises(AuditCancelled):
        heatmaps_for(wide, sae, 1, "cls", TensorImages(pixels, [0] * 5, ["a"]), {0: [0, 1]})


def test_heatmaps_for_refuses_an_image_that_is_not_in_the_set(wide, pixels):
    sae = sae_for(wide.model.visual, 1, "cls", pixels)
    with pytest.raises(EngineError, match="image 5 does not exist"):
        heatmaps_for(wide, sae, 1, "cls", TensorImages(pixels, [0] * 5, ["a"]), {0: [5]})


def test_a_map_survives_the_json_round_trip_to_within_one_step_of_255():
    grid = np.random.default_rng(0).random((4, 6)).astype(np.float32) * 7.5
    encoded = encode_map(grid)
    assert isinstance(encoded, list) and all(isinstance(v, int) for row in encoded for v in row)
    assert max(max(row) for row in encoded) == 255 and min(min(row) for row in encoded) >= 0
    np.testing.assert_allclose(decode_map(encoded), grid / grid.max(), atol=0.5 / 255 + 1e-6)
    assert decode_map(encoded).dtype == np.float32


def test_a_map_without_mass_stays_zero():
    assert encode_map(np.zeros((2, 3))) == [[0, 0, 0], [0, 0, 0]]
    assert encode_map(torch.zeros(2, 2)) == [[0, 0], [0, 0]]
    assert not decode_map([[0, 0]]).any()


def test_all_the_mass_inside_the_mask_scores_one_and_a_uniform_map_scores_the_masks_area():
    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:24] = True  # exactly cells (1, 1) and (1, 2) of a 4 x 4 grid
    inside = np.zeros((4, 4))
    inside[1, 1], inside[1, 2] = 3.0, 1.0
    assert mass_on_mask(inside, mask) == (pytest.approx(1.0), pytest.approx(0.125))
    assert mass_on_mask(np.ones((4, 4)), mask) == (pytest.approx(0.125), pytest.approx(0.125))
    outside = np.zeros((4, 4))
    outside[3, 0] = 1.0
    assert mass_on_mask(outside, mask)[0] == 0.0
    assert np.isnan(mass_on_mask(np.zeros((4, 4)), mask)[0])


def test_cells_that_cut_pixels_count_them_by_area():
    """A 3 x 3 grid over 10 x 10 pixels: cell borders cut pixels. Upsampling the mask threefold makes every cell
    exactly 10 x 10 pixels, where the share is a plain count."""
    rng = np.random.default_rng(1)
    mask = rng.random((10, 10)) < 0.3
    grid = rng.random((3, 3))
    fine = mask.repeat(3, 0).repeat(3, 1)
    covered = fine.reshape(3, 10, 3, 10).mean(axis=(1, 3))
    mass, chance = mass_on_mask(grid, mask)
    assert mass == pytest.approx((grid * covered).sum() / grid.sum())
    assert chance == pytest.approx(mask.mean())
