"""SAEs trained elsewhere: registered for a model (ours and SAELens' format), refused when they do not fit, and
used by an audit instead of training one; the same SAE in either format gives the same audit."""
import json

import pytest
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile

from audit_service.audits.models import Status
from audit_service.audits.services import create_audit
from audit_service.registry.models import SparseAutoencoder
from audit_service.registry.services import RegistrationError
from workers import tasks
from workers.engine.sae import TopKSAE
from workers.engine.sae_formats import export_sae_lens, resid_post_hook

from .conftest import FAST_AUDIT
from .test_corrections import audited  # noqa: F401 (a fixture)

pytestmark = pytest.mark.django_db


def stored(key: str, name: str) -> SimpleUploadedFile:
    with default_storage.open(key, "rb") as fh:
        return SimpleUploadedFile(name, fh.read())


def ours(audit) -> dict:
    artifacts = audit.result["artifacts"]
    return {"config": stored(artifacts["sae/sae.json"], "sae.json"),
            "weights": stored(artifacts["sae/sae.safetensors"], "sae.safetensors")}


def sae_lens(audit, tmp_path, block: int) -> dict:
    folder = tmp_path / "sae-lens"
    sae = TopKSAE.load(default_storage.path(audit.result["artifacts"]["sae/sae.json"]).rsplit("/", 1)[0])
    export_sae_lens(sae, folder, hook_name=resid_post_hook(block))
    return {"config": SimpleUploadedFile("cfg.json", (folder / "cfg.json").read_bytes()),
            "weights": SimpleUploadedFile("sae_weights.safetensors", (folder / "sae_weights.safetensors").read_bytes())}


def audit_with(audited, users, registered, **options):  # noqa: F811
    audit = create_audit(project=audited.project, user=users["member"], clip_model=audited.clip_model,
                         probe=audited.probe, dataset=audited.dataset, sae=registered,
                         options={**{k: v for k, v in FAST_AUDIT.items() if k != "sae"}, **options})
    tasks.run_audit.apply(args=[audit.pk])
    audit.refresh_from_db()
    assert audit.status == Status.SUCCEEDED, audit.error
    return audit


def flags_of(audit) -> list:
    return sorted((f.head, f.class_name, f.latent, round(f.share, 6)) for f in audit.flags.all())


def test_the_same_sae_in_either_format_gives_the_audit_that_trained_it(audited, users, client_for, tmp_path):  # noqa: F811
    model = audited.clip_model
    client = client_for("member")
    registered = {}
    block = model.n_blocks + model.layer if model.layer < 0 else model.layer
    for fmt, files in (("ours", ours(audited)), ("sae_lens", sae_lens(audited, tmp_path, block))):
        response = client.post("/api/v1/saes/", {"project": audited.project_id, "clip_model": model.pk,
                                                 "name": f"imported {fmt}", "format": fmt, **files},
                               format="multipart")
        assert response.status_code == 201, response.json()
        body = response.json()
        assert (body["d_model"], body["n_latents"]) == (model.width, audited.result["sae"]["n_latents"])
        registered[fmt] = SparseAutoencoder.objects.get(pk=body["id"])
    with_ours, with_lens = (audit_with(audited, users, registered[f]) for f in ("ours", "sae_lens"))
    # a registered SAE comes alone (no other dictionaries vote on its flags): the audit that trained it, alone
    alone = audit_with(audited, users, None, dictionaries=1, sae=FAST_AUDIT["sae"])
    assert alone.result["sae"]["n_latents"] == audited.result["sae"]["n_latents"]
    assert flags_of(with_ours) == flags_of(alone) and flags_of(with_lens) == flags_of(with_ours)
    assert all(f.stability["found_by"] == f.stability["of"] == 1 for f in with_ours.flags.all())
    labels = [(l.latent, l.label) for l in with_ours.latents.all()]
    assert labels == [(l.latent, l.label) for l in with_lens.latents.all()]
    for audit, fmt in ((with_ours, "ours"), (with_lens, "sae_lens")):
        sae = audit.result["sae"]
        assert sae["steps"] == 0 and {"fvu", "mean_l0", "dead_fraction"} <= set(sae)  # measured, not trained
        assert audit.result["registered_sae"]["format"] == fmt
        assert set(audit.result["artifacts"]) >= {"sae/sae.safetensors", "sae/sae.json", "sae/metrics.json"}
    assert with_ours.result["sae"]["fvu"] == pytest.approx(with_lens.result["sae"]["fvu"], abs=1e-5)


def test_saes_that_do_not_fit_are_refused_naming_why_and_store_nothing(audited, users, client_for, tmp_path,  # noqa: F811
                                                                      media):
    model = audited.clip_model
    client = client_for("member")
    url, base = "/api/v1/saes/", {"project": audited.project_id, "clip_model": model.pk, "name": "x"}
    before = {p for p in media.rglob("*") if p.is_file()}
    other_block = (model.n_blocks + model.layer - 1) if model.layer < 0 else model.layer - 1
    narrow = TopKSAE(model.width // 2, 16, 4)
    narrow_folder = tmp_path / "narrow"
    narrow.save(narrow_folder)
    cases = [
        ({**sae_lens(audited, tmp_path, other_block), "format": "sae_lens"}, "weights",
         f"trained on block {other_block}"),
        ({"config": SimpleUploadedFile("sae.json", (narrow_folder / "sae.json").read_bytes()),
          "weights": SimpleUploadedFile("sae.safetensors", (narrow_folder / "sae.safetensors").read_bytes()),
          "format": "ours"}, "weights", f"reads {model.width // 2}-dimensional activations"),
        ({**ours(audited), "format": "dictionary"}, "format", "dictionary"),
        ({"config": SimpleUploadedFile("sae.json", b"{oops"), "weights": ours(audited)["weights"], "format": "ours"},
         "config", "not valid JSON"),
    ]
    for files, field, words in cases:
        response = client.post(url, {**base, **files}, format="multipart")
        assert response.status_code == 400, response.content
        assert words in " ".join(response.json()[field]), response.json()
    assert not SparseAutoencoder.objects.exists() and {p for p in media.rglob("*") if p.is_file()} == before
    assert client_for("viewer").post(url, {**base, **ours(audited), "format": "ours"},
                                     format="multipart").status_code == 403


def test_an_audit_takes_only_an_sae_of_its_model_and_no_sae_options(audited, users, project, assets):  # noqa: F811
    from audit_service.registry.services import register_model, register_probe, register_sae

    from .conftest import upload

    sae = register_sae(project=project, user=users["member"], name="ours", clip_model=audited.clip_model,
                       format="ours", **ours(audited))
    other = register_model(project=project, user=users["member"], name="twin",
                           model_config=json.loads(assets["config"].read_text()), checkpoint=upload(assets["checkpoint"]))
    probe = register_probe(project=project, user=users["member"], name="twin probe", clip_model=other,
                           file=upload(assets["probe"]))
    with pytest.raises(RegistrationError, match="was registered for model") as refused:
        create_audit(project=project, user=users["member"], clip_model=other, probe=probe, dataset=audited.dataset,
                     sae=sae)
    assert refused.value.field == "sae"
    with pytest.raises(RegistrationError, match="trains none, so leave them out"):
        create_audit(project=project, user=users["member"], clip_model=audited.clip_model, probe=audited.probe,
                     dataset=audited.dataset, sae=sae, options={"sae": {"steps": 10}})


def test_the_web_forms_register_an_sae_and_audit_with_it(audited, users, web):  # noqa: F811
    member = web("member")
    url = f"/projects/{audited.project_id}/saes/new/"
    page = member.post(url, {"name": "from the lab", "clip_model": audited.clip_model_id, "format": "sae_lens",
                             **ours(audited)}, follow=True).content.decode()
    assert "errorlist" in page and not SparseAutoencoder.objects.exists()  # our files are not SAELens' files
    response = member.post(url, {"name": "from the lab", "clip_model": audited.clip_model_id, "format": "ours",
                                 **ours(audited)}, follow=True)
    sae = SparseAutoencoder.objects.get()
    assert "SAE &#x27;from the lab&#x27; registered" in response.content.decode()
    assert "from the lab" in member.get(f"/projects/{audited.project_id}/").content.decode()
    response = member.post(f"/projects/{audited.project_id}/audits/new/", {
        "clip_model": audited.clip_model_id, "probe": audited.probe_id, "dataset": audited.dataset_id,
        "sae": sae.pk, "options": json.dumps({"batch_size": 16})})
    assert response.status_code == 302, response.content.decode()[:2000]
    assert audited.project.audits.get(sae=sae)
    assert web("viewer").get(url).status_code == 403
