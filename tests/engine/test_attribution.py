"""Attribution equals an independent reference: full autograd through the whole spliced model."""
import pytest
import torch
import torch.nn.functional as F

from workers.engine.attribution import REGISTRY, get_method
from workers.engine.errors import EngineError
from workers.engine.heads import LinearProbe, ZeroShotHead
from workers.engine.hooks import VisionTail, capture_residual, select_tokens, spliced_sae
from workers.engine.sae import TopKSAE, init_from_sample

CLASSES = ["nevus", "melanoma", "seborrheic keratosis"]


def _setup(tiny, images, layer, token, dtype=torch.float64):
    model = tiny.model.to(dtype)
    x = images.to(dtype)
    with capture_residual(model.visual, layer) as store, torch.no_grad():
        model.encode_image(x)
    h = store["h"]
    sae = TopKSAE(h.shape[-1], 40, 6).to(dtype)
    init_from_sample(sae, select_tokens(h, token).reshape(-1, h.shape[-1]), seed=0)
    sae.requires_grad_(False).to(dtype)
    gen = torch.Generator().manual_seed(3)
    heads = {
        "probe": LinearProbe(torch.randn(3, 32, generator=gen), torch.randn(3, generator=gen), CLASSES,
                             "l2", mean=0.1 * torch.randn(32, generator=gen),
                             scale=1 + torch.rand(32, generator=gen)).to(dtype),
        "zero_shot": ZeroShotHead(torch.randn(3, 32, generator=gen), CLASSES).to(dtype),
    }
    return model, x, h, sae, heads


def _reference(model, x, layer, token, sae, head):
    """The slow way: one full forward and backward pass through the whole model per class."""
    out = []
    for c in range(len(CLASSES)):
        with spliced_sae(model.visual, layer, sae, token, latents_require_grad=True) as store:
            y = head(model.encode_image(x))[:, c].sum()
        z = store["latents"]
        r = z * torch.autograd.grad(y, z)[0]
        out.append(r.sum(1) if r.ndim == 3 else r)
    return torch.stack(out, 1)  # [batch, classes, latents]


@pytest.mark.parametrize("layer", [-1, -2])
@pytest.mark.parametrize("token", ["cls", "spatial"])
@pytest.mark.parametrize("head_name", ["probe", "zero_shot"])
def test_act_grad_equals_full_backprop_through_the_spliced_model(tiny, images, layer, token, head_name):
    model, x, h, sae, heads = _setup(tiny, images, layer, token)
    head = heads[head_name]
    tail = VisionTail(model.visual, layer, token)
    relevance = get_method("act_grad", tail=tail, sae=sae, head=head, token=token).attribute(h, batch_size=5)
    reference = _reference(model, x, layer, token, sae, head)
    assert relevance.shape == (len(x), 3, 40)
    assert (relevance - reference).abs().max() <= 1e-5
    if not (layer == -1 and token == "spatial"):  # there patch tokens cannot reach the CLS-pooled output
        assert reference.abs().max() > 1e-3  # the comparison is not between two zeros


def test_act_grad_in_float32_matches_the_float64_reference(tiny, images):
    model, x, h, sae, heads = _setup(tiny, images, -2, "cls")
    reference = _reference(model, x, -2, "cls", sae, heads["probe"])
    tail32 = VisionTail(model.float().visual, -2, "cls")
    got = get_method("act_grad", tail=tail32, sae=sae.float(), head=heads["probe"].float(),
                     token="cls").attribute(h.float())
    assert (got.double() - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_one_target_per_image_equals_that_class_of_the_all_class_result(tiny, images, name):
    model, x, h, sae, heads = _setup(tiny, images, -2, "cls")
    method = get_method(name, tail=VisionTail(model.visual, -2, "cls"), sae=sae, head=heads["probe"], token="cls")
    target = torch.tensor([0, 1, 2] * 4)
    all_classes = method.attribute(h)
    one = method.attribute(h, target=target)
    assert one.shape == (12, 1, 40)
    if name == "random":
        assert ((one[:, 0] > 0) == (all_classes[torch.arange(12), target] > 0)).all()
    else:
        assert torch.allclose(one[:, 0], all_classes[torch.arange(12), target], atol=1e-12)


def test_baselines_follow_their_formulas(tiny, images):
    model, x, h, sae, heads = _setup(tiny, images, -1, "cls")
    tail = VisionTail(model.visual, -1, "cls")
    head = heads["zero_shot"]
    kwargs = dict(tail=tail, sae=sae, head=head, token="cls")
    z = sae.encode(h[:, 0])
    active = (z > 0).double()
    d = sae.dictionary
    lens = F.normalize(model.visual.ln_post(d) @ model.visual.proj, dim=-1) @ head.text.T  # [latents, classes]
    assert torch.allclose(get_method("logit_lens", **kwargs).attribute(h), active[:, None] * lens.T[None])
    assert torch.allclose(get_method("act_logit_lens", **kwargs).attribute(h), z[:, None] * lens.T[None])
    energy = get_method("energy", **kwargs).attribute(h)
    assert torch.allclose(energy, (z * d.norm(dim=1))[:, None].expand(-1, 3, -1))
    rnd = get_method("random", **kwargs).attribute(h)
    assert ((rnd > 0) == (active[:, None] > 0)).all()
    assert torch.equal(rnd, get_method("random", **kwargs).attribute(h))  # seeded


def test_an_unknown_method_is_refused_with_the_known_ones():
    with pytest.raises(EngineError, match="unknown attribution method 'saliency'; known: act_grad"):
        get_method("saliency")
