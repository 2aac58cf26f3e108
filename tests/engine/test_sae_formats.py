"""SAEs from elsewhere: SAELens folders read into our TopK SAE, ours written as SAELens folders, refusals, and an
audit with an imported SAE giving the answer of the same SAE in our format."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from workers.engine import run_audit
from workers.engine.errors import EngineError
from workers.engine.sae import TopKSAE
from workers.engine.sae_formats import (check_fits, describe_sae, detect_format, export_sae_lens,
                                        layer_from_hook_name, load_sae, resid_post_hook)

from .conftest import assert_same_answer, build_audit_config

D_IN, D_SAE, K = 8, 16, 3

# cfg.json as SAELens 6.54.12 writes it for a TopK SAE (TopKTrainingSAE.save_inference_model): keys and values
# copied from a file the library saved.
SAE_LENS_TOPK_CFG = {
    "d_in": D_IN, "d_sae": D_SAE, "k": K, "dtype": "float32", "device": "cpu", "architecture": "topk",
    "normalize_activations": "none", "apply_b_dec_to_input": True, "reshape_activations": "none",
    "rescale_acts_by_decoder_norm": True,
    "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12",
                 "training_architecture": "topk",
                 "training_architecture_details": {"decoder_init_norm": 0.1, "use_sparse_activations": False,
                                                   "aux_loss_coefficient": 1.0}},
}
# The same SAE as a config from before SAELens 6 names it (no architecture field; the top-k in the activation).
SAE_LENS_PRE_6_TOPK_CFG = {
    "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "model_name": "ViT-B-32",
    "hook_point": "blocks.7.hook_resid_post", "hook_point_layer": 7, "activation_fn_str": "topk",
    "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True, "normalize_activations": False,
    "sae_lens_training_version": "3.20.0",
}


def random_weights(seed: int = 0) -> dict:
    """SAELens-shaped tensors; decoder rows of uneven norms, so that folding them matters."""
    gen = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D_IN, D_SAE, generator=gen), "b_enc": torch.randn(D_SAE, generator=gen),
            "W_dec": torch.randn(D_SAE, D_IN, generator=gen) * torch.rand(D_SAE, 1, generator=gen) * 3,
            "b_dec": torch.randn(D_IN, generator=gen)}


def write_sae_lens(folder, cfg: dict, weights: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def sae_lens_by_hand(x: torch.Tensor, w: dict, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, reconstruction) computed the way SAELens' TopK SAE computes them from its config."""
    sae_in = x - w["b_dec"] if cfg.get("apply_b_dec_to_input", True) else x
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    norms = w["W_dec"].norm(dim=-1)
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * norms
    values, indices = pre.topk(cfg.get("k") or cfg["activation_fn_kwargs"]["k"], dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    decoded = (z / norms if cfg.get("rescale_acts_by_decoder_norm") else z) @ w["W_dec"] + w["b_dec"]
    return z, decoded


def random_ours(seed: int = 1) -> TopKSAE:
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(D_IN, D_SAE, K, input_scale=2.5)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        sae.normalize_decoder()
    return sae


@pytest.fixture
def x():
    return torch.randn(64, D_IN, generator=torch.Generator().manual_seed(5)) * 3 + 1


# ------------------------------------------------------------------------------------------------------ import
@pytest.mark.parametrize("options", [{}, {"apply_b_dec_to_input": False},
                                     {"rescale_acts_by_decoder_norm": False},
                                     {"apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": False}])
def test_a_sae_lens_topk_folder_encodes_and_decodes_as_sae_lens_does(tmp_path, x, options):
    cfg = {**SAE_LENS_TOPK_CFG, **options}
    weights = random_weights()
    folder = write_sae_lens(tmp_path / "sl", cfg, weights)
    assert detect_format(folder) == "sae_lens"
    sae = load_sae(folder)
    z_ref, decoded_ref = sae_lens_by_hand(x, weights, cfg)
    assert (sae.encode(x) > 0).sum(-1).max() <= K
    torch.testing.assert_close(sae.encode(x), z_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sae(x)[0], decoded_ref, rtol=1e-5, atol=1e-4)
    assert (sae.d_model, sae.n_latents, sae.k) == (D_IN, D_SAE, K)


def test_a_config_from_before_sae_lens_6_loads_with_its_k_and_layer(tmp_path, x):
    weights = random_weights(2)
    folder = write_sae_lens(tmp_path / "old", SAE_LENS_PRE_6_TOPK_CFG, weights)
    info = describe_sae(folder)
    assert (info.format, info.architecture, info.k, info.hook_name, info.layer, info.model_name) == \
        ("sae_lens", "topk", K, "blocks.7.hook_resid_post", 7, "ViT-B-32")
    z_ref, decoded_ref = sae_lens_by_hand(x, weights, SAE_LENS_PRE_6_TOPK_CFG)
    sae = load_sae(folder, "sae_lens")
    torch.testing.assert_close(sae.encode(x), z_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sae(x)[0], decoded_ref, rtol=1e-5, atol=1e-4)


def test_half_precision_weights_are_read_as_float32(tmp_path, x):
    weights = {k: v.to(torch.bfloat16) for k, v in random_weights(3).items()}
    folder = write_sae_lens(tmp_path / "bf16", {**SAE_LENS_TOPK_CFG, "dtype": "bfloat16"}, weights)
    sae = load_sae(folder)
    assert sae.W_enc.dtype == torch.float32
    z_ref, _ = sae_lens_by_hand(x, {k: v.float() for k, v in weights.items()}, SAE_LENS_TOPK_CFG)
    torch.testing.assert_close(sae.encode(x), z_ref, rtol=1e-5, atol=1e-4)


def test_our_own_format_loads_unchanged(tmp_path, x):
    ours = random_ours()
    ours.save(tmp_path / "ours")
    assert detect_format(tmp_path / "ours") == "ours"
    again = load_sae(tmp_path / "ours")
    assert torch.equal(again.encode(x), ours.encode(x))
    assert describe_sae(tmp_path / "ours").to_dict()["n_latents"] == D_SAE


# ------------------------------------------------------------------------------------------------------ export
def test_our_sae_written_for_sae_lens_reads_back_with_the_same_latents_and_reconstruction(tmp_path, x):
    ours = random_ours()
    folder = export_sae_lens(ours, tmp_path / "export", hook_name=resid_post_hook(2), model_name="tiny",
                             metadata={"clip_audit_token": "cls"})
    cfg = json.loads((folder / "cfg.json").read_text())
    # the keys SAELens writes for an inference TopK SAE, and the values that select its arithmetic
    assert set(SAE_LENS_TOPK_CFG) <= set(cfg)
    assert (cfg["architecture"], cfg["k"], cfg["d_in"], cfg["d_sae"], cfg["apply_b_dec_to_input"],
            cfg["rescale_acts_by_decoder_norm"], cfg["normalize_activations"]) == \
        ("topk", K, D_IN, D_SAE, True, False, "none")
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post" and cfg["metadata"]["clip_audit_token"] == "cls"
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == \
        {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}
    # SAELens' arithmetic on the written files gives our SAE's latents and reconstruction
    z_ref, decoded_ref = sae_lens_by_hand(x, weights, cfg)
    torch.testing.assert_close(z_ref, ours.encode(x), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(decoded_ref, ours(x)[0], rtol=1e-5, atol=1e-4)
    back = load_sae(folder)
    torch.testing.assert_close(back.encode(x), ours.encode(x), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(back.dictionary, ours.dictionary)
    assert describe_sae(folder).layer == 2


# ----------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("architecture", ["jumprelu", "gated", "abstopk", "matching_pursuit"])
def test_an_architecture_without_a_topk_equivalent_is_refused_by_name(tmp_path, architecture):
    folder = write_sae_lens(tmp_path / architecture, {**SAE_LENS_TOPK_CFG, "architecture": architecture},
                            random_weights())
    with pytest.raises(EngineError, match=f"architecture '{architecture}' is not supported"):
        load_sae(folder)
    with pytest.raises(EngineError, match=f"architecture '{architecture}'"):
        describe_sae(folder)


def test_a_relu_sae_is_refused_unless_imported_densely_and_then_matches_relu(tmp_path, x):
    cfg = {k: v for k, v in SAE_LENS_TOPK_CFG.items() if k not in ("k", "rescale_acts_by_decoder_norm")}
    weights = random_weights(4)
    folder = write_sae_lens(tmp_path / "relu", {**cfg, "architecture": "standard"}, weights)
    with pytest.raises(EngineError, match="'standard' is a ReLU SAE.*dense_relu=True"):
        load_sae(folder)
    sae = load_sae(folder, dense_relu=True)
    assert sae.k == D_SAE
    z = F.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    torch.testing.assert_close(sae.encode(x), z, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sae(x)[0], z @ weights["W_dec"] + weights["b_dec"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("norm", ["expected_average_only_in", "layer_norm", "constant_norm_rescale"])
def test_an_sae_that_expects_normalized_activations_is_refused(tmp_path, norm):
    folder = write_sae_lens(tmp_path / norm, {**SAE_LENS_TOPK_CFG, "normalize_activations": norm}, random_weights())
    with pytest.raises(EngineError, match=f"normalize_activations '{norm}' is not supported"):
        load_sae(folder)


def test_weights_that_disagree_with_the_config_are_refused(tmp_path):
    folder = write_sae_lens(tmp_path / "wide", {**SAE_LENS_TOPK_CFG, "d_sae": 32}, random_weights())
    with pytest.raises(EngineError, match=r"W_enc is \[8, 16\], expected \[8, 32\]"):
        load_sae(folder)
    folder = write_sae_lens(tmp_path / "extra", SAE_LENS_TOPK_CFG,
                            {**random_weights(), "threshold": torch.zeros(D_SAE)})
    with pytest.raises(EngineError, match="unexpected threshold"):
        load_sae(folder)


def test_a_folder_without_an_sae_says_what_it_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(EngineError, match="expected sae.json \\+ sae.safetensors .*found notes.txt"):
        load_sae(tmp_path)
    with pytest.raises(EngineError, match="unknown SAE format 'sparsify'"):
        load_sae(tmp_path, "sparsify")


def test_a_width_mismatch_names_both_widths(tmp_path):
    folder = write_sae_lens(tmp_path / "sl", SAE_LENS_TOPK_CFG, random_weights())
    with pytest.raises(EngineError, match="reads 8-dimensional activations but the audited layer of this model is "
                                          "48-dimensional"):
        check_fits(describe_sae(folder), 48)
    check_fits(load_sae(folder), D_IN)


def test_hook_names_and_layers_translate_both_ways():
    assert layer_from_hook_name(resid_post_hook(11)) == 11
    assert layer_from_hook_name("blocks.3.attn.hook_z") is None and layer_from_hook_name(None) is None


# ------------------------------------------------------------------------------------------------------ audits
def test_an_audit_with_an_imported_sae_gives_the_answer_of_the_same_sae_in_our_format(tiny, probe, dataset,
                                                                                       tmp_path):
    # thresholds that flag what the random tiny model relies on, so that there are flags to compare
    config = build_audit_config(flag_without_harm=True, flag_max_alignment=1.0)
    run_audit(config, tiny, probe, dataset, workdir=tmp_path / "trained")
    ours = TopKSAE.load(tmp_path / "trained" / "sae")
    export_sae_lens(ours, tmp_path / "sae-lens", hook_name=resid_post_hook(2))
    imported = load_sae(tmp_path / "sae-lens")
    check_fits(imported, tiny.model.visual.transformer.width)
    # the imported weights are not ours copied: the input scale is folded into them
    assert float(imported.input_scale) == 1.0 and float(ours.input_scale) != 1.0

    with_ours = run_audit(config, tiny, probe, dataset, workdir=tmp_path / "a", sae=ours)
    with_imported = run_audit(config, tiny, probe, dataset, workdir=tmp_path / "b", sae=imported)
    assert len(with_ours.flags) >= 3 and with_ours.relevance["probe"]["melanoma"]["top"]
    assert 0 < with_imported.sae["fvu"] < 1 and with_imported.sae["mean_l0"] <= ours.k
    assert_same_answer(with_ours.to_dict(), with_imported.to_dict())


def test_an_audit_given_an_sae_of_another_width_is_refused_naming_both_widths(tmp_path):
    from workers.engine import AuditConfig
    from workers.engine.data import TensorImages
    from workers.engine.heads import LinearProbe
    from workers.engine.tiny import tiny_clip

    bundle = tiny_clip()
    width = bundle.model.visual.transformer.width
    images = TensorImages(torch.rand(4, 3, 32, 32), [0, 1, 0, 1], ["a", "b"])
    probe = LinearProbe(torch.randn(2, bundle.embed_dim), torch.zeros(2), ["a", "b"])
    with pytest.raises(EngineError, match=rf"the SAE reads {width + 8}-dimensional activations, the layer has {width}"):
        run_audit(AuditConfig(general_vocabulary=False, causal=False), bundle, probe, images, workdir=tmp_path,
                  sae=TopKSAE(width + 8, 16, 4))
