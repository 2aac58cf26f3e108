"""The architecture matrix: every kind of image tower in ``architectures.ARCHITECTURES``, on random weights.

A supported kind is built (open_clip's own configs for ViT-B-32, ViT-B-16, ViT-L-14 and a -quickgelu variant;
tiny configs for the poolings no small built-in has) and must: capture the residual stream [batch, 1 + patches,
width]; have its tail recompute the image embedding from the cached stream; give act x grad through the tail
equal to a full backward pass through the spliced model (float64, 1e-5, as tests/engine/test_attribution.py);
and run a whole audit on a few random images, whose flagged latents get heatmaps. A refused kind is refused with the message that
names why, before anything is built wherever a config shows it.

Nothing is downloaded: built-in architectures are built from open_clip's bundled configs with random weights.
"""
from dataclasses import dataclass

import open_clip
import pytest
import torch
from open_clip.model import CLIP, ModifiedResNet
from open_clip.timm_model import TimmModel

from workers.engine.architectures import (ARCHITECTURES, COCA_REASON, OUTPUT_TOKENS_REASON, POOL_NONE_REASON,
                                          REFUSED, SUPPORTED, architecture, check_supported, config_refusal,
                                          pooling)
from workers.engine.attribution import get_method
from workers.engine.config import AuditConfig, SAEConfig
from workers.engine.data import TensorImages
from workers.engine.errors import EngineError
from workers.engine.heads import LinearProbe
from workers.engine.heatmaps import latent_heatmaps
from workers.engine.hooks import VisionTail, capture_residual, has_hooks, select_tokens, spliced_sae
from workers.engine.loading import load_clip
from workers.engine.model_config import register_model_config, size_model_config
from workers.engine.pipeline import run_audit
from workers.engine.sae import TopKSAE, init_from_sample
from workers.engine.tiny import tiny_clip, tiny_config

CLASSES = ["nevus", "melanoma"]


@dataclass(frozen=True)
class Case:
    id: str
    key: str  # the ARCHITECTURES row it stands for
    model: str | dict  # a built-in architecture (random weights) or a tiny config
    audit: tuple[int, str]  # the audit's (layer, token): one the pooling lets reach the output
    compared: tuple[tuple[int, str], ...]  # (layer, token) pairs compared with the full backward pass
    audit_images: int = 4


def _attention_pooled(**extra) -> dict:
    return tiny_config(attentional_pool=True, attn_pooler_heads=2, **extra)


CLS_POOLED = dict(audit=(-1, "cls"), compared=((-1, "cls"), (-2, "spatial")))
AVERAGE_POOLED = dict(audit=(-1, "spatial"), compared=((-1, "spatial"), (-2, "cls")))
CASES = (
    Case("ViT-B-32", "vit-cls", "ViT-B-32", **CLS_POOLED),
    Case("ViT-B-32-quickgelu", "vit-cls", "ViT-B-32-quickgelu", **CLS_POOLED),
    Case("ViT-B-16", "vit-cls", "ViT-B-16", **CLS_POOLED),
    # the largest: one comparison, through its last block (the CLS-only tail of layer -1 is the B models')
    Case("ViT-L-14", "vit-cls", "ViT-L-14", audit=(-1, "cls"), compared=((-2, "spatial"),), audit_images=2),
    Case("tiny-quick-gelu", "vit-cls", {**tiny_config(), "quick_gelu": True}, **CLS_POOLED),
    Case("tiny-avg", "vit-avg", tiny_config(pool_type="avg"), **AVERAGE_POOLED),
    Case("tiny-cls-final-ln", "vit-final-ln", tiny_config(final_ln_after_pool=True), **CLS_POOLED),
    Case("tiny-clipa-layout", "vit-final-ln", tiny_config(pool_type="avg", final_ln_after_pool=True, no_ln_pre=True),
         **AVERAGE_POOLED),
    Case("tiny-attn-pool-1-query", "vit-attn-pool", _attention_pooled(attn_pooler_queries=1),
         audit=(-1, "spatial"), compared=((-1, "spatial"), (-1, "cls"))),
    Case("tiny-attn-pool-4-queries-avg", "vit-attn-pool", _attention_pooled(attn_pooler_queries=4, pool_type="avg"),
         audit=(-1, "cls"), compared=((-1, "cls"), (-2, "spatial"))),
)


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def built(request):
    """(case, bundle) built once per case; pytest runs each case's tests together, so one model is held at a time."""
    case = request.param
    torch.manual_seed(0)
    if isinstance(case.model, str):
        bundle = load_clip(case.model, allow_random=True)
    else:
        bundle = tiny_clip(0, config=case.model)
    return case, bundle


def _pixels(bundle, n: int, dtype=torch.float32) -> torch.Tensor:
    h, w = bundle.model.visual.image_size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _sae_for(h: torch.Tensor, token: str) -> TopKSAE:
    selected = select_tokens(h, token).reshape(-1, h.shape[-1])
    sae = TopKSAE(h.shape[-1], 64, 6).to(h.dtype)
    init_from_sample(sae, selected, seed=0)
    return sae.requires_grad_(False)


def _probe(embed_dim: int, dtype=torch.float32) -> LinearProbe:
    gen = torch.Generator().manual_seed(3)
    return LinearProbe(torch.randn(2, embed_dim, generator=gen), torch.randn(2, generator=gen), CLASSES).to(dtype)


# --------------------------------------------------------------------------- supported kinds

def test_every_supported_kind_has_a_case_in_the_matrix():
    assert {c.key for c in CASES} == {a.key for a in ARCHITECTURES if a.status == SUPPORTED}


def test_each_case_is_accepted_with_the_layers_and_tokens_it_is_checked_at(built):
    case, bundle = built

    assert architecture(case.key).status == SUPPORTED
    for layer, token in (case.audit, *case.compared):
        check_supported(bundle.model.visual, layer, token)


def test_the_hooks_capture_the_stream_and_the_tail_recomputes_the_image_embedding_from_it(built):
    _, bundle = built
    visual = bundle.model.visual
    gh, gw = visual.grid_size
    x = _pixels(bundle, 2)

    with capture_residual(visual, 0) as first, capture_residual(visual, -2) as before_last, \
            capture_residual(visual, -1) as last, torch.no_grad():
        expected = bundle.model.encode_image(x)

    assert not has_hooks(bundle.model)
    for store in (first, before_last, last):
        assert store["h"].shape == (2, 1 + gh * gw, bundle.width)
    for layer, store in ((-1, last), (-2, before_last)):
        for token in ("cls", "spatial"):  # the class-token-only tail (layer -1, CLS pooling) and the full one
            with torch.no_grad():
                got = VisionTail(visual, layer, token)(store["h"])
            assert got.shape == (2, bundle.embed_dim)
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item()), (layer, token)


def test_the_logit_lens_is_the_tail_of_a_stream_holding_the_direction_at_every_token(built):
    _, bundle = built
    visual = bundle.model.visual
    directions = torch.randn(5, bundle.width, generator=torch.Generator().manual_seed(2))
    tokens = 1 + visual.grid_size[0] * visual.grid_size[1]
    tail = VisionTail(visual, -1, "spatial")

    with torch.no_grad():
        lens = tail.logit_lens(directions)
        through_the_tail = tail(directions.unsqueeze(1).expand(-1, tokens, -1))

    assert torch.allclose(lens, through_the_tail, rtol=1e-4, atol=1e-6)


def _full_backward(model, x, layer, token, sae, head) -> torch.Tensor:
    """The slow way: a forward pass through the whole spliced model, then one backward pass per class."""
    with spliced_sae(model.visual, layer, sae, token, latents_require_grad=True) as store:
        y = head(model.encode_image(x))  # [batch, classes]
    z = store["latents"]
    out = []
    for c in range(len(CLASSES)):
        r = z * torch.autograd.grad(y[:, c].sum(), z, retain_graph=c < len(CLASSES) - 1)[0]
        out.append(r.sum(1) if r.ndim == 3 else r)
    return torch.stack(out, 1)  # [batch, classes, latents]


def test_act_grad_through_the_tail_equals_the_full_backward_pass(built):
    case, bundle = built
    model = bundle.model
    model.visual.double()  # float64 as in test_attribution; put back below, the module's later tests use float32
    try:
        pixels = _pixels(bundle, 2, torch.float64)
        x = pixels[:1]  # one image attributed: the reference costs a full pass of the model
        head = _probe(bundle.embed_dim, torch.float64)
        with capture_residual(model.visual, -1) as last, capture_residual(model.visual, -2) as before_last, \
                torch.no_grad():
            model.encode_image(pixels)
        for layer, token in case.compared:
            stream = (last if layer == -1 else before_last)["h"]
            sae = _sae_for(stream, token)  # two images, so that one CLS token is not the SAE's mean
            h = stream[:1]
            tail = VisionTail(model.visual, layer, token)
            relevance = get_method("act_grad", tail=tail, sae=sae, head=head, token=token).attribute(h)
            reference = _full_backward(model, x, layer, token, sae, head)
            diff = (relevance - reference).abs().max().item()
            print(f"{case.id} layer {layer} token {token}: max |act x grad - full backward| = {diff:.3g}, "
                  f"max |relevance| = {reference.abs().max().item():.3g}")
            assert relevance.shape == (1, len(CLASSES), 64)
            assert diff <= 1e-5
            assert reference.abs().max() > 1e-3  # the comparison is not between two zeros
    finally:
        model.visual.float()
    assert not has_hooks(model)


def test_a_whole_audit_runs_and_its_flagged_latents_have_heatmaps(built, tmp_path):
    case, bundle = built
    layer, token = case.audit
    n = case.audit_images
    dataset = TensorImages(_pixels(bundle, n), [0, 1] * (n // 2), CLASSES)
    config = AuditConfig(
        layer=layer, token=token, device="cpu", batch_size=2, sae=SAEConfig(n_latents=64, k=4, steps=20, batch_size=8),
        n_references=2, prompt_templates=("a photo of {}.",), artifact_vocabulary=("a ruler", "a watermark"),
        general_vocabulary=False, faithfulness_steps=2, faithfulness_max_images=2, causal=False,
        flag_without_harm=True, top_images_per_flag=2, report_top_n=5)

    result = run_audit(config, bundle, _probe(bundle.embed_dim), dataset, workdir=tmp_path).to_dict()

    assert result["model"] == {"name": bundle.name, "layer": layer, "token": token, "n_blocks": bundle.n_blocks,
                               "width": bundle.width, "embed_dim": bundle.embed_dim}
    assert result["dataset"]["n_images"] == n
    for head in ("probe", "zero_shot"):
        assert set(result["relevance"][head]) == set(CLASSES)
        assert len(result["faithfulness"][head]["melanoma"]["act_grad"]["curve"]) == 3
    flagged = sorted({f["latent"] for f in result["flags"]})[:2]
    if flagged:  # the maps a report shows for them, on the tower's patch grid
        sae = TopKSAE.load(tmp_path / "sae", "cpu")
        maps = latent_heatmaps(bundle.model.visual, sae, layer, token, dataset.images[:1], flagged)
        assert maps.shape == (1, len(flagged), *bundle.model.visual.grid_size)
        assert torch.isfinite(maps).all() and (maps >= 0).all()


# --------------------------------------------------------------------------- refused kinds

def _refusal(call) -> str:
    with pytest.raises(EngineError) as err:
        call()
    return err.value.message


def test_every_refused_kind_has_a_refusal_test():
    refused = {a.key for a in ARCHITECTURES if a.status == REFUSED}
    tested = {name.split("_refuses_")[1].replace("_", "-") for name in globals()
              if name.startswith("test_it_refuses_")}
    assert refused == tested


@pytest.fixture
def not_built(monkeypatch) -> list:
    """Every model open_clip is asked to build; a refusal a config shows must leave this empty."""
    built = []
    monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda name, **kw: built.append(name))
    return built


def test_it_refuses_timm(not_built):
    message = _refusal(lambda: load_clip("ViT-B-16-SigLIP", allow_random=True))
    assert message.startswith("ViT-B-16-SigLIP: the image tower is a timm model (vision_cfg.timm_model_name "
                              "'vit_base_patch16_siglip_224', pooling 'map'), not open_clip's VisionTransformer")
    assert "SigLIP's has no class token and pools with a MAP head" in message
    assert not_built == []
    for name in ("EVA02-B-16", "PE-Core-B-16", "ViTamin-S", "MobileCLIP-S1", "convnext_base", "vit_medium_patch16_gap_256"):
        assert "is a timm model" in config_refusal(open_clip.get_model_config(name)), name
    siglip_like = TimmModel("vit_tiny_patch16_224", embed_dim=192, pool="map", proj="none")  # built: 6M weights
    assert _refusal(lambda: check_supported(siglip_like)).startswith(
        "the image tower is a timm model (VisionTransformer 'map'-pooled), not open_clip's VisionTransformer")


def test_it_refuses_resnet(not_built):
    assert _refusal(lambda: load_clip("RN50", allow_random=True)).startswith(
        "RN50: the image tower is a ResNet (vision_cfg.layers [3, 4, 6, 3]): it has no residual stream of tokens")
    assert not_built == []
    resnet = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=32, heads=2, image_size=64, width=8)
    assert _refusal(lambda: check_supported(resnet)) == (
        "the image tower is a ResNet (ModifiedResNet): it has no residual stream of tokens for the SAE to decompose "
        "after a block; only open_clip VisionTransformer towers can be audited")


def test_it_refuses_coca(not_built):
    assert _refusal(lambda: load_clip("coca_ViT-B-32", allow_random=True)) == f"coca_ViT-B-32: {COCA_REASON}"
    config = {**tiny_config(), "multimodal_cfg": {"width": 32, "heads": 2, "layers": 1}}
    assert _refusal(lambda: register_model_config(config)) == f"model config: {COCA_REASON}"
    assert not_built == []


def _open_clip_built(**vision) -> CLIP:
    """A tiny CLIP built by open_clip itself, past the engine's config checks (a tower as a caller might hand it)."""
    config = tiny_config(**vision)
    return CLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"])


def test_it_refuses_pool_none(not_built):
    assert _refusal(lambda: register_model_config(tiny_config(pool_type="none"))) == (
        "model config: vision_cfg.pool_type must be one of 'tok', 'avg', got \"none\"")
    assert not_built == []
    assert _refusal(lambda: check_supported(_open_clip_built(pool_type="none").visual)) == POOL_NONE_REASON
    attention_pooled = _open_clip_built(pool_type="none", attentional_pool=True, attn_pooler_heads=2)
    assert attention_pooled.encode_image(torch.randn(1, 3, 32, 32)).ndim == 3  # one embedding per query
    assert _refusal(lambda: check_supported(attention_pooled.visual)) == POOL_NONE_REASON


def test_it_refuses_attn_pool_pair(not_built):
    message = _refusal(lambda: load_clip(model_config=tiny_config(attentional_pool="parallel"), allow_random=True))
    assert message.startswith("model config: vision_cfg.attentional_pool 'parallel' (two attention poolers")
    assert not_built == []
    paired = _open_clip_built(attentional_pool="cascade", attn_pooler_heads=2)
    with pytest.raises(RuntimeError):  # the premise: open_clip cannot run it
        paired.encode_image(torch.randn(1, 3, 32, 32))
    assert "vision_cfg.attentional_pool 'cascade'" in _refusal(lambda: check_supported(paired.visual))


def test_it_refuses_output_tokens(not_built):
    assert _refusal(lambda: load_clip(model_config=tiny_config(output_tokens=True), allow_random=True)) == (
        f"model config: {OUTPUT_TOKENS_REASON}")
    assert not_built == []
    tokens_too = _open_clip_built(output_tokens=True)
    assert isinstance(tokens_too.encode_image(torch.randn(1, 3, 32, 32)), tuple)  # the premise
    assert _refusal(lambda: check_supported(tokens_too.visual)) == OUTPUT_TOKENS_REASON


def test_it_refuses_hf_text(not_built):
    import importlib.util

    if importlib.util.find_spec("transformers") is not None:
        pytest.skip("transformers is installed here, so Hugging Face tokenizers are not refused")
    assert _refusal(lambda: load_clip("ViT-L-14-CLIPA", allow_random=True)) == (
        "ViT-L-14-CLIPA: the model's text tokenizer comes from Hugging Face ('bert-base-uncased') and needs the "
        "transformers package, which is not installed here; pick a model with open_clip's own tokenizer and text "
        "tower (e.g. ViT-B-32, ViT-L-14) or install transformers with the Hugging Face files cached")
    assert "text tower comes from Hugging Face ('roberta-base')" in _refusal(
        lambda: load_clip("roberta-ViT-B-32", allow_random=True))
    assert not_built == []


# --------------------------------------------------------------------------- layers, tokens, sizes

def test_a_token_the_pooling_drops_is_refused_and_an_attention_pooler_drops_none():
    average_pooled = tiny_clip(0, config=tiny_config(pool_type="avg")).model.visual
    attention_pooled = tiny_clip(0, config=_attention_pooled(attn_pooler_queries=1)).model.visual

    assert (pooling(average_pooled), pooling(attention_pooled)) == ("avg", "attn")
    assert "pick layer -2 or token spatial" in _refusal(lambda: check_supported(average_pooled, -1, "cls"))
    assert "does not exist" in _refusal(lambda: check_supported(average_pooled, 3, "spatial"))
    assert _refusal(lambda: check_supported(average_pooled, -1, "patch")) == (
        "token must be one of cls, spatial, got 'patch'")
    for token in ("cls", "spatial"):
        check_supported(attention_pooled, -1, token)


@pytest.mark.parametrize("config", [_attention_pooled(attn_pooler_queries=1),
                                    _attention_pooled(attn_pooler_queries=4, pool_type="avg", width=64,
                                                      no_ln_pre=True)],
                         ids=["one-query", "four-queries-wider-than-embed-dim"])
def test_an_attention_pooled_configs_parameter_count_is_the_built_models(config):
    size = size_model_config(config)

    model = load_clip(model_config=config, allow_random=True).model

    assert size.parameters == sum(p.numel() for p in model.parameters())
    assert size.pool_type == "attn"
