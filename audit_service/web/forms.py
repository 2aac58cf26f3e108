"""Forms of the web UI. They only parse input; the registry and audit services validate it, as for the API."""
from __future__ import annotations

from django import forms

from audit_service.audits.models import Verdict
from audit_service.registry.models import (DatasetLayout, DatasetPurpose, DatasetSource, Normalization, SAEFormat,
                                           TokenType)
from audit_service.registry.services import RegistrationError, read_json_upload


def _preselect_single(form, *names) -> None:
    """A choice with only one possible answer starts answered."""
    for name in names:
        field = form.fields[name]
        if field.queryset.count() == 1:
            field.initial = field.queryset.first().pk


class ModelForm(forms.Form):
    name = forms.CharField(max_length=200)
    architecture = forms.CharField(max_length=100, required=False,
                                   help_text="An OpenCLIP architecture such as ViT-B-32; leave empty with a config.")
    pretrained_tag = forms.CharField(max_length=100, required=False,
                                     help_text="e.g. laion2b_s34b_b79k (needs internet on the workers)")
    model_config = forms.FileField(required=False, help_text="open_clip model config (.json), for custom models")
    checkpoint = forms.FileField(required=False, help_text=".safetensors, .pt or .bin state dict")
    layer = forms.IntegerField(initial=-1, help_text="Vision transformer block to decompose (-1: the last). After "
                                                     "the last block only the tokens the model pools reach its "
                                                     "output: the CLS token (most models) or the patch tokens "
                                                     "(average-pooled ones)")
    token = forms.ChoiceField(choices=TokenType.choices, initial=TokenType.CLS)

    def clean_model_config(self):
        upload = self.cleaned_data.get("model_config")
        if not upload:
            return None
        try:
            value = read_json_upload(upload)
        except RegistrationError as exc:
            raise forms.ValidationError(exc.message) from exc
        if not isinstance(value, dict):
            raise forms.ValidationError("the model config must be a JSON object")
        return value


class ProbeForm(forms.Form):
    name = forms.CharField(max_length=200)
    clip_model = forms.ModelChoiceField(queryset=None, label="Model",
                                        help_text="The model whose image embeddings the probe was trained on")
    file = forms.FileField(help_text=".npz (weight, bias, class_names) or .safetensors; never a pickle")
    class_names = forms.CharField(required=False, help_text="Comma-separated, when the file does not name them")
    normalization = forms.ChoiceField(choices=[("", "as stored in the file")] + list(Normalization.choices),
                                      required=False)

    def __init__(self, *args, project, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["clip_model"].queryset = project.clip_models.all()
        _preselect_single(self, "clip_model")

    def clean_class_names(self):
        text = self.cleaned_data.get("class_names", "")
        return [c.strip() for c in text.split(",") if c.strip()] or None


class DatasetForm(forms.Form):
    name = forms.CharField(max_length=200)
    source = forms.ChoiceField(choices=DatasetSource.choices, initial=DatasetSource.UPLOAD, required=False,
                               label="Where the images are",
                               help_text="Upload an archive, or register images that already sit in the media "
                                         "store's bucket or in a server folder an admin allowed: they are read "
                                         "there, checked once, and never copied through this page")
    archive = forms.FileField(required=False,
                              help_text="A .zip or .tar(.gz) with the images and a comma-separated labels.csv "
                                        "(image,label, optional metadata columns such as 'a ruler' or 'site'; image "
                                        "paths relative to the folder that holds labels.csv), or one folder per "
                                        "class")
    location = forms.CharField(required=False, max_length=1000,
                               help_text="By reference: the S3 prefix (datasets/lesions) or the server folder "
                                         "(/data/lesions)")
    layout = forms.ChoiceField(choices=[("auto", "detect (shards when every file is a .tar)"),
                                        *DatasetLayout.choices], initial="auto", required=False,
                               help_text="By reference: image files like an upload's, or WebDataset .tar shards with "
                                         "a .cls or .json label per sample")
    purpose = forms.ChoiceField(choices=DatasetPurpose.choices, initial=DatasetPurpose.AUDIT, required=False,
                                help_text="SAE training: images alone are enough (no labels); such a dataset "
                                          "trains an audit's SAE and is never audited itself")

    def clean(self):
        data = super().clean()
        data["source"] = data.get("source") or DatasetSource.UPLOAD
        data["layout"] = data.get("layout") or "auto"
        return data

    def clean_purpose(self):
        return self.cleaned_data.get("purpose") or DatasetPurpose.AUDIT


class SAEForm(forms.Form):
    name = forms.CharField(max_length=200)
    clip_model = forms.ModelChoiceField(queryset=None, label="Model",
                                        help_text="The model (and its registered layer and token) the SAE was "
                                                  "trained on")
    format = forms.ChoiceField(choices=SAEFormat.choices, initial=SAEFormat.SAE_LENS)
    config = forms.FileField(help_text="sae.json (ours) or cfg.json (SAELens)")
    weights = forms.FileField(help_text="sae.safetensors (ours) or sae_weights.safetensors (SAELens)")

    def __init__(self, *args, project, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["clip_model"].queryset = project.clip_models.all()
        _preselect_single(self, "clip_model")


class AuditForm(forms.Form):
    clip_model = forms.ModelChoiceField(queryset=None, label="Model")
    probe = forms.ModelChoiceField(queryset=None)
    dataset = forms.ModelChoiceField(queryset=None)
    sae_dataset = forms.ModelChoiceField(queryset=None, required=False, label="SAE training dataset",
                                         empty_label="the audited dataset",
                                         help_text="Train the SAE on another dataset of the project, e.g. a "
                                                   "larger unlabelled one; attribution and flags still use the "
                                                   "audited dataset")
    sae = forms.ModelChoiceField(queryset=None, required=False, label="Registered SAE", empty_label="train one",
                                 help_text="An SAE trained elsewhere and registered for the model, used instead "
                                           "of training one (leave the SAE sizes empty)")
    # ranges are the audit options' (the service checks them, as for the API); a refusal shows on these fields
    n_latents = forms.IntegerField(required=False, label="SAE latents",
                                   help_text="Empty: sized to the data (about 4 x the model width)")
    k = forms.IntegerField(required=False, label="Active latents per input (k)",
                           help_text="Empty: about n_latents / 32, at most 64")
    expected_concepts = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 3}),
        help_text="What each class should mean, one class per line: 'melanoma: melanoma, irregular mole'. "
                  "Empty: the class name.")
    general_vocabulary = forms.BooleanField(required=False, initial=True,
                                            label="Label latents with the ImageNet vocabulary too")
    causal = forms.BooleanField(required=False, initial=True, label="Confirm flags by ablation and insertion")
    options = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}), label="More options (JSON)",
                              help_text='Any other audit option, e.g. {"flag_min_share": 0.03}')

    def __init__(self, *args, project, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["clip_model"].queryset = project.clip_models.all()
        self.fields["probe"].queryset = project.probes.select_related("clip_model")
        self.fields["dataset"].queryset = project.datasets.filter(purpose=DatasetPurpose.AUDIT)
        self.fields["sae_dataset"].queryset = project.datasets.all()
        self.fields["sae"].queryset = project.saes.select_related("clip_model")
        _preselect_single(self, "clip_model", "probe", "dataset")

    def clean_expected_concepts(self):
        text = self.cleaned_data.get("expected_concepts", "")
        expected = {}
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            if ":" not in line:
                raise forms.ValidationError(f"line {n}: write 'class: concept, concept'")
            name, concepts = line.split(":", 1)
            expected[name.strip()] = [c.strip() for c in concepts.split(",") if c.strip()]
        return expected

    def clean_options(self):
        text = self.cleaned_data.get("options", "").strip()
        if not text:
            return {}
        try:
            value = read_json_upload(text)
        except RegistrationError as exc:
            raise forms.ValidationError(exc.message) from None
        if not isinstance(value, dict):
            raise forms.ValidationError("write a JSON object, e.g. {\"flag_min_share\": 0.03}")
        return value

    # the audit options this form has a field of its own for
    OPTION_FIELDS = {"sae.n_latents": "n_latents", "sae.k": "k"}

    def audit_options(self) -> dict:
        data = self.cleaned_data
        options = dict(data["options"])
        sae = options.pop("sae", {})
        if isinstance(sae, dict):  # anything else is left for the service to refuse, naming "sae"
            sae = {**sae, **{key: data[key] for key in ("n_latents", "k") if data.get(key) is not None}}
        if sae != {}:
            options["sae"] = sae
        if data["expected_concepts"]:
            options["expected_concepts"] = data["expected_concepts"]
        options.setdefault("general_vocabulary", data["general_vocabulary"])
        options.setdefault("causal", data["causal"])
        return options

    def add_error(self, field, error):
        """A refused option shows on its own field when the form has one and it was filled in."""
        if field == "options" and isinstance(error, str):
            for option, name in self.OPTION_FIELDS.items():
                if error.startswith(f"{option}:") and self.cleaned_data.get(name) is not None:
                    field = name
        super().add_error(field, error)


class ReviewForm(forms.Form):
    verdict = forms.ChoiceField(choices=Verdict.choices)
    note = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}), max_length=5000)


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What the token is for, e.g. 'ci-pipeline'")
    projects = forms.ModelMultipleChoiceField(queryset=None, required=False, widget=forms.CheckboxSelectMultiple,
                                              help_text="Limit the token to these projects; none ticked: all yours")

    def __init__(self, *args, user, **kwargs):
        from audit_service.projects.models import Project

        super().__init__(*args, **kwargs)
        self.fields["projects"].queryset = Project.objects.for_user(user)
