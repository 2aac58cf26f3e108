"""Registering SAEs trained elsewhere, hardened: a config's claims are checked against the weights' header before
anything is allocated, only the audited block's residual stream is accepted, weights and input scales must be
finite (and the scale positive), sizes must be integers, configs are read with the bounded JSON reader, and
every refusal is a 400 that names the file and the fix, shows no server path and stores nothing."""
import json
import re
import tempfile
from pathlib import Path

import pytest
import torch
from django.core.files.uploadedfile import SimpleUploadedFile
from safetensors.torch import load_file, save_file

from audit_service.registry import services
from audit_service.registry.models import SparseAutoencoder
from tests.support import synthetic
from workers.engine.sae import TopKSAE
from workers.engine.sae_formats import export_sae_lens, resid_post_hook

from .conftest import upload

pytestmark = pytest.mark.django_db
URL = "/api/v1/saes/"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return synthetic.write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def model(project, users, tiny_files):
    config, checkpoint = tiny_files
    return services.register_model(project=project, user=users["member"], name="tiny",
                                   model_config=json.loads(config.read_text()), checkpoint=upload(checkpoint))


@pytest.fixture
def post(model, client_for, media):
    """Post an SAE's files for ``model`` as a member; ``post.refused(response, *words)`` checks a refusal."""
    client = client_for("member")
    before = stored_files(media)

    def send(format: str, files: dict):
        return client.post(URL, {"project": model.project_id, "clip_model": model.pk, "name": "from the lab",
                                 "format": format, **files}, format="multipart")

    def refused(response, *words):
        assert response.status_code == 400, response.content
        text = " ".join(" ".join(messages) for messages in response.json().values())
        for word in words:
            assert word in text, text
        assert tempfile.gettempdir() not in text and str(media) not in text, text  # no server path
        assert not SparseAutoencoder.objects.exists() and stored_files(media) == before
        return text

    send.refused = refused
    return send


def stored_files(media: Path) -> set:
    return {p for p in media.rglob("*") if p.is_file()}


def audited_block(model) -> int:
    return model.layer if model.layer >= 0 else model.n_blocks + model.layer


def random_sae(width: int, n_latents: int = 16, k: int = 4) -> TopKSAE:
    gen = torch.Generator().manual_seed(0)
    sae = TopKSAE(width, n_latents, k, input_scale=2.0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return sae


def ours(sae: TopKSAE, folder: Path, config: dict | None = None, tensors: dict | None = None) -> dict:
    """Our format's uploads of ``sae``, with config keys and tensors replaced as given."""
    state = {**{k: v.detach().contiguous() for k, v in sae.state_dict().items()}, **(tensors or {})}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "sae.safetensors"))
    return {"config": SimpleUploadedFile("sae.json", json.dumps({**sae.config(), **(config or {})}).encode()),
            "weights": SimpleUploadedFile("sae.safetensors", (folder / "sae.safetensors").read_bytes())}


def sae_lens(sae: TopKSAE, folder: Path, hook_name: str, config: dict | None = None,
             tensors: dict | None = None) -> dict:
    """SAELens' uploads of ``sae`` trained on ``hook_name``, with config keys and tensors replaced as given."""
    export_sae_lens(sae, folder, hook_name=hook_name)
    cfg = {**json.loads((folder / "cfg.json").read_text()), **(config or {})}
    weights = {**load_file(str(folder / "sae_weights.safetensors")), **(tensors or {})}
    save_file(weights, str(folder / "sae_weights.safetensors"))
    return {"config": SimpleUploadedFile("cfg.json", json.dumps(cfg).encode()),
            "weights": SimpleUploadedFile("sae_weights.safetensors",
                                          (folder / "sae_weights.safetensors").read_bytes())}


def files_of(format: str, model, tmp_path, config=None, tensors=None, n_latents: int = 16) -> dict:
    sae = random_sae(model.width, n_latents)
    if format == "ours":
        return ours(sae, tmp_path / "ours", config, tensors)
    return sae_lens(sae, tmp_path / "sae-lens", resid_post_hook(audited_block(model)), config, tensors)


def peak_memory_growth_mb(call):
    """(``call()``, how far it raised this process's peak resident memory above its resident memory before, in
    MB): the web process's own measure, torch's allocations included (tracemalloc sees only Python's)."""
    def kb(key: str) -> int:
        return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))

    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the resident size now
    except OSError as exc:
        pytest.skip(f"the peak resident memory cannot be reset here: {exc}")
    before = kb("VmRSS")
    result = call()
    return result, (kb("VmHWM") - before) / 1024


# --------------------------------------------------------------------------------------------- 1. memory
def test_a_config_claiming_millions_of_latents_over_tiny_weights_is_refused_before_anything_is_allocated(
        model, post, tmp_path):
    small, huge = (files_of("ours", model, tmp_path / str(n), config={"n_latents": n}) for n in (32, 2_000_000))
    assert post("ours", small).status_code == 400  # the code paths loaded, then measured
    response, grown = peak_memory_growth_mb(lambda: post("ours", huge))
    assert grown < 50, f"registering took the web process {grown:.0f} MB above where it was"
    post.refused(response, "the weights do not match sae.json", "n_latents=2000000",
                 f"W_enc is [16, {model.width}], expected [2000000, {model.width}]")


def test_an_sae_wider_than_the_latent_bound_is_refused_naming_the_setting(model, post, tmp_path, settings):
    settings.SAE_MAX_LATENTS = 8
    for format in ("ours", "sae_lens"):
        post.refused(post(format, files_of(format, model, tmp_path / format)),
                     "16 latents, over the limit of 8 (SAE_MAX_LATENTS)")


# ---------------------------------------------------------------------------------------------- 2. hooks
@pytest.mark.parametrize("hook", ["blocks.3.hook_resid_pre", "blocks.1.attn.hook_z", "../../etc/passwd",
                                  "blocks.-1.hook_resid_post"])
def test_a_sae_lens_hook_other_than_the_audited_blocks_residual_stream_is_refused(model, post, tmp_path, hook):
    accepted = resid_post_hook(audited_block(model))
    files = sae_lens(random_sae(model.width), tmp_path / "sl", hook)
    text = post.refused(post("sae_lens", files), f"the SAE reads hook {hook!r}", f"only {accepted!r}")
    assert "is accepted" in text


def test_the_audited_blocks_residual_stream_is_accepted(model, post, tmp_path):
    response = post("sae_lens", files_of("sae_lens", model, tmp_path))
    assert response.status_code == 201, response.json()
    sae = SparseAutoencoder.objects.get()
    assert sae.description["hook_name"] == resid_post_hook(audited_block(model)) and sae.n_latents == 16


# --------------------------------------------------------------------------------------- 3. finite weights
NAN, INF = float("nan"), float("inf")


def poisoned(name: str, shape_of, value: float) -> dict:
    tensor = torch.ones(shape_of)
    tensor.view(-1)[0] = value
    return {name: tensor}


@pytest.mark.parametrize("format, name, value", [
    ("ours", "W_enc", NAN), ("ours", "b_enc", INF), ("sae_lens", "W_dec", NAN), ("sae_lens", "b_dec", -INF)])
def test_weights_holding_nan_or_infinity_are_refused_naming_the_tensor(model, post, tmp_path, format, name,
                                                                       value):
    d, n = model.width, 16
    shapes = {"ours": {"W_enc": (n, d), "b_enc": (n,)}, "sae_lens": {"W_dec": (n, d), "b_dec": (d,)}}
    files = files_of(format, model, tmp_path, tensors=poisoned(name, shapes[format][name], value))
    post.refused(post(format, files), f"{name} holds NaN or infinite values")


@pytest.mark.parametrize("value, words", [(NAN, "input_scale holds NaN or infinite values"),
                                          (INF, "input_scale holds NaN or infinite values"),
                                          (0.0, "input_scale is 0.0; it must be a positive finite number"),
                                          (-1.0, "input_scale is -1.0; it must be a positive finite number")])
def test_an_input_scale_in_the_weights_that_is_not_positive_and_finite_is_refused(model, post, tmp_path, value,
                                                                                  words):
    files = files_of("ours", model, tmp_path, tensors={"input_scale": torch.tensor(value)})
    post.refused(post("ours", files), words)


@pytest.mark.parametrize("value, words", [
    (0, "input_scale must be a positive finite number, got 0"),
    (-2.5, "input_scale must be a positive finite number, got -2.5"),
    ("2", "input_scale must be a positive finite number, got '2'"),
    (NAN, "NaN is not a number JSON allows"),  # json.dumps writes NaN and Infinity, which JSON has not
    (INF, "Infinity is not a number JSON allows")])
def test_an_input_scale_in_the_config_that_is_not_positive_and_finite_is_refused(model, post, tmp_path, value,
                                                                                 words):
    post.refused(post("ours", files_of("ours", model, tmp_path, config={"input_scale": value})), "sae.json", words)


# ------------------------------------------------------------------------------------------ 4. integer sizes
@pytest.mark.parametrize("format, key, value", [
    ("sae_lens", "d_in", "width + 0.9"), ("ours", "d_model", "width + 0.0"), ("ours", "n_latents", 16.5),
    ("sae_lens", "d_sae", 16.0), ("sae_lens", "k", "4"), ("ours", "k", True)])
def test_a_size_that_is_not_an_integer_is_refused_not_cut(model, post, tmp_path, format, key, value):
    if isinstance(value, str) and value.startswith("width"):
        value = model.width + float(value.split(" + ")[1])
    response = post(format, files_of(format, model, tmp_path, config={key: value}))
    post.refused(response, f"{key} must be a whole number, got {value!r}")
    assert response.json()["config"]


# --------------------------------------------------------------------------------------- 5. bounded JSON
@pytest.mark.parametrize("format, key", [("sae_lens", "d_sae"), ("ours", "n_latents"), ("sae_lens", "k")])
def test_a_config_holding_a_number_of_thousands_of_digits_is_a_400_naming_the_file(model, post, tmp_path,
                                                                                   format, key):
    files = files_of(format, model, tmp_path, config={key: "BIG"})
    name = files["config"].name
    text = files["config"].read().decode().replace('"BIG"', "7" * 5000)
    response = post(format, {**files, "config": SimpleUploadedFile(name, text.encode())})
    post.refused(response, f"the SAE config {name}: a number of 5000 digits", "at most")
    assert list(response.json()) == ["config"]


def test_a_deeply_nested_config_is_a_400_naming_the_file(model, post, tmp_path):
    files = files_of("sae_lens", model, tmp_path)
    deep = '{"d_in": 8, "metadata": ' + "[" * 20_000 + "]" * 20_000 + "}"
    post.refused(post("sae_lens", {**files, "config": SimpleUploadedFile("cfg.json", deep.encode())}),
                 "the SAE config cfg.json is nested too deeply")


# ------------------------------------------------------------------------------------- no server paths
@pytest.mark.parametrize("format, config, weights, words", [
    ("ours", None, b"not a safetensors file", "sae.safetensors is not a safetensors file"),
    ("sae_lens", {"architecture": "jumprelu"}, None, "cfg.json: SAELens architecture 'jumprelu' is not supported"),
    ("sae_lens", {"metadata": ["not", "an", "object"]}, None, "cfg.json: metadata must be a JSON object"),
    ("sae_lens", {"hook_name": 3, "metadata": {}}, None, "cfg.json: hook_name must be a string, got 3")])
def test_refusals_name_the_file_never_a_server_path(model, post, tmp_path, format, config, weights, words):
    files = files_of(format, model, tmp_path, config=config)
    if weights is not None:
        files["weights"] = SimpleUploadedFile(files["weights"].name, weights)
    post.refused(post(format, files), words)
