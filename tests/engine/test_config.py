"""Audit and SAE configs: JSON round trips and the messages a user sees for bad options."""
import json

import pytest

from workers.engine.config import DEFAULT_PROMPT_TEMPLATES, AuditConfig, SAEConfig
from workers.engine.errors import EngineError


def build_audit_config(**overrides) -> AuditConfig:
    base = dict(layer=-2, token="spatial", spatial_pool="mean", dtype="bf16", cache_dtype="float16", batch_size=8,
                sae=SAEConfig(n_latents=256, k=8, lr=5e-4, steps=1234, aux_k=16, seed=3),
                prompt_templates=("a photo of {}.", "a dermoscopy image of {}."),
                class_prompts={"melanoma": ["a melanoma"]},
                expected_concepts={"melanoma": ["irregular pigment network", "blue-white veil"]},
                artifact_vocabulary=("a ruler", "hair"), general_vocabulary=False, flag_top_n=5,
                flag_min_share=0.1, flag_max_alignment=0.02, causal=False, seed=11)
    base.update(overrides)
    return AuditConfig(**base)


def test_audit_config_round_trips_through_a_dict_with_the_nested_sae_config():
    cfg = build_audit_config()
    data = cfg.to_dict()
    assert data["sae"] == {"n_latents": 256, "k": 8, "lr": 5e-4, "batch_size": 256, "steps": 1234, "aux_k": 16,
                           "aux_coef": 1.0 / 32.0, "dead_after_steps": 100, "tokens_per_image": 16, "seed": 3}
    assert data["prompt_templates"] == ["a photo of {}.", "a dermoscopy image of {}."]
    assert data["artifact_vocabulary"] == ["a ruler", "hair"]
    back = AuditConfig.from_dict(data)
    assert back == cfg
    assert isinstance(back.sae, SAEConfig) and back.sae.k == 8
    assert back.prompt_templates == ("a photo of {}.", "a dermoscopy image of {}.")


def test_to_dict_is_json_serialisable_and_survives_a_json_round_trip():
    for cfg in (AuditConfig(), build_audit_config()):
        text = json.dumps(cfg.to_dict())
        assert AuditConfig.from_dict(json.loads(text)) == cfg


def test_from_dict_of_nothing_gives_the_defaults():
    assert AuditConfig.from_dict(None) == AuditConfig()
    assert AuditConfig.from_dict({}).prompt_templates == DEFAULT_PROMPT_TEMPLATES
    assert AuditConfig.from_dict({"sae": {"k": 4}}).sae == SAEConfig(k=4)


def test_an_unknown_option_is_named_and_the_known_ones_are_listed():
    with pytest.raises(EngineError) as err:
        AuditConfig.from_dict({"layer": 3, "n_refs": 16})
    message = err.value.message
    assert "unknown AuditConfig option(s): n_refs" in message
    assert "known options are:" in message
    for known in ("n_references", "layer", "flag_top_n", "sae"):
        assert known in message


def test_an_unknown_sae_option_is_named_too():
    with pytest.raises(EngineError, match=r"unknown SAEConfig option\(s\): latents;.*n_latents"):
        AuditConfig.from_dict({"sae": {"latents": 100}})


@pytest.mark.parametrize("overrides, field", [
    ({"token": "patch"}, "token"),
    ({"dtype": "fp64"}, "dtype"),
    ({"spatial_pool": "median"}, "spatial_pool"),
    ({"cache_dtype": "bfloat16"}, "cache_dtype"),
    ({"n_references": 1}, "n_references"),
    ({"flag_min_share": 1.5}, "flag_min_share"),
    ({"expected_concepts": {"melanoma": "pigment"}}, "expected_concepts"),
])
def test_a_bad_value_is_refused_with_a_message_naming_the_field(overrides, field):
    with pytest.raises(EngineError, match=field):
        AuditConfig(**overrides)


def test_a_bad_token_message_lists_the_choices_and_the_value_given():
    with pytest.raises(EngineError) as err:
        AuditConfig.from_dict({"token": "patch"})
    assert err.value.message == "token must be one of ('cls', 'spatial'), got 'patch'"
    with pytest.raises(EngineError) as err:
        AuditConfig(dtype="fp64")
    assert err.value.message == "dtype must be one of ('fp32', 'bf16', 'fp16'), got 'fp64'"


def test_a_prompt_template_without_a_placeholder_is_refused():
    with pytest.raises(EngineError, match=r"prompt template must contain '\{\}'"):
        AuditConfig(prompt_templates=["a photo of {}.", "a photo of a thing."])
    with pytest.raises(EngineError, match="prompt template"):
        AuditConfig(prompt_templates=[])


def test_sae_config_refuses_k_above_n_latents():
    with pytest.raises(EngineError) as err:
        SAEConfig(n_latents=32, k=64)
    assert err.value.message == "sae.k (64) cannot exceed sae.n_latents (32)"
    assert SAEConfig(n_latents=32, k=32).k == 32
    with pytest.raises(EngineError, match=r"sae.k \(9\) cannot exceed sae.n_latents \(8\)"):
        AuditConfig.from_dict({"sae": {"n_latents": 8, "k": 9}})


@pytest.mark.parametrize("overrides, message", [
    ({"k": 0}, "sae.k must be at least 1"),
    ({"n_latents": 1}, "sae.n_latents must be at least 2"),
    ({"lr": 0.0}, "sae.lr must be positive"),
    ({"steps": 0}, "sae.steps must be at least 1"),
])
def test_sae_config_refuses_out_of_range_values(overrides, message):
    with pytest.raises(EngineError) as err:
        SAEConfig(**overrides)
    assert err.value.message == message


def test_a_dict_for_sae_in_the_constructor_becomes_an_sae_config():
    cfg = AuditConfig(sae={"n_latents": 64, "k": 4})
    assert cfg.sae == SAEConfig(n_latents=64, k=4)


def test_tuples_of_concepts_round_trip_equal():
    cfg = AuditConfig(expected_concepts={"melanoma": ("melanoma", "dark lesion")})
    assert AuditConfig.from_dict(cfg.to_dict()) == cfg
