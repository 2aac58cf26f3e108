"""Audit and SAE configs: JSON round trips and the messages a user sees for bad options."""
import json

import pytest

from workers.engine.config import DEFAULT_PROMPT_TEMPLATES, AuditConfig, Bound, SAEConfig, check_bounds, json_schema
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


# what an earlier release stored in an audit row (its to_dict)
STORED_BEFORE = {
    "layer": -2, "token": "spatial", "spatial_pool": "max", "device": "auto", "dtype": "fp32",
    "cache_dtype": "float32", "batch_size": 64,
    "sae": {"n_latents": 256, "k": 8, "lr": 0.001, "batch_size": 256, "steps": 1234, "aux_k": None,
            "aux_coef": 0.03125, "dead_after_steps": 100, "tokens_per_image": 16, "seed": 0},
    "n_references": 16,
    "prompt_templates": ["a photo of {}.", "an image of {}.", "a close-up photo of {}.", "a picture showing {}."],
    "class_prompts": {}, "expected_concepts": {"melanoma": ["irregular pigment network"]},
    "artifact_vocabulary": ["a ruler"], "general_vocabulary": True, "label_min_confidence": 0.6, "flag_top_n": 10,
    "flag_min_share": 0.05, "flag_max_alignment": 0.05, "flag_relative_alignment": 0.5, "flag_class_margin": 0.02,
    "flag_without_harm": False, "flag_group_similarity": 0.6, "harm_min_gap": 0.2, "harm_min_z": 3.0,
    "amplification_ratio": 1.5, "faithfulness_steps": 20, "faithfulness_max_images": 256, "top_images_per_flag": 8,
    "report_top_n": 50, "causal": False, "seed": 11}


def test_audit_config_round_trips_through_a_dict_with_the_nested_sae_config():
    cfg = build_audit_config()
    data = cfg.to_dict()
    assert data["sae"] == {"n_latents": 256, "k": 8, "lr": 5e-4, "batch_size": 256, "steps": 1234, "aux_k": 16,
                           "aux_coef": 1.0 / 32.0, "dead_after_steps": 100, "tokens_per_image": 16,
                           "patch_tokens": 0, "variant": "topk", "seed": 3}
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
    # what an earlier release stored in an audit row: a worker that picks such an audit up loads it
    assert AuditConfig.from_dict(STORED_BEFORE).sae == SAEConfig(n_latents=256, k=8, steps=1234)
    # options added since come with their defaults
    assert AuditConfig.from_dict(STORED_BEFORE).to_dict() == {**STORED_BEFORE, "heatmaps": True, "dictionaries": 3,
                                                               "sae": {**STORED_BEFORE["sae"], "variant": "topk",
                                                                       "patch_tokens": 0},
                                                               "match_min_correlation": 0.6,
                                                               "flag_min_stability": 0.5, "heatmap_method": "attnlrp",
                                                               "heatmap_blocks": 3, "heatmap_cells": 2, "suspects": []}


def test_from_dict_of_nothing_gives_the_defaults():
    assert AuditConfig.from_dict(None) == AuditConfig()
    assert AuditConfig.from_dict({}).prompt_templates == DEFAULT_PROMPT_TEMPLATES
    assert AuditConfig.from_dict({"sae": {"k": 4}}).sae == SAEConfig(k=4)


def test_an_unknown_option_is_named_and_the_known_ones_are_listed():
    with pytest.raises(EngineError) as err:
        AuditConfig.from_dict({"layer": 3, "n_refs": 16})
    message = err.value.message
    assert "unknown option(s): n_refs" in message
    assert "known options are:" in message
    for known in ("n_references", "layer", "flag_top_n", "sae"):
        assert known in message


def test_an_unknown_sae_option_is_named_too():
    with pytest.raises(EngineError, match=r"unknown sae option\(s\): latents; known sae options are: .*n_latents"):
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
    assert err.value.message == "token: must be 'cls' or 'spatial', got 'patch'"
    with pytest.raises(EngineError) as err:
        AuditConfig(dtype="fp64")
    assert err.value.message == "dtype: must be 'fp32', 'bf16' or 'fp16', got 'fp64'"


def test_a_prompt_template_without_a_placeholder_is_refused():
    with pytest.raises(EngineError) as err:
        AuditConfig(prompt_templates=["a photo of {}.", "a photo of a thing."])
    assert err.value.message == ("prompt_templates: every template must contain '{}' where the concept goes; "
                                 "'a photo of a thing.' does not")
    with pytest.raises(EngineError, match="prompt_templates: must have at least 1 item"):
        AuditConfig(prompt_templates=[])


def test_sae_config_refuses_k_above_n_latents():
    with pytest.raises(EngineError) as err:
        SAEConfig(n_latents=32, k=64)
    assert err.value.message == "sae.k: cannot exceed sae.n_latents (32), got 64"
    assert SAEConfig(n_latents=32, k=32).k == 32
    with pytest.raises(EngineError, match=r"sae.k: cannot exceed sae.n_latents \(8\), got 9"):
        AuditConfig.from_dict({"sae": {"n_latents": 8, "k": 9}})


@pytest.mark.parametrize("overrides, message", [
    ({"k": 0}, "sae.k: must be at least 1, got 0"),
    ({"n_latents": 1}, "sae.n_latents: must be at least 2, got 1"),
    ({"lr": 0.0}, "sae.lr: must be more than 0, got 0.0"),
    ({"steps": 0}, "sae.steps: must be at least 1, got 0"),
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


# --------------------------------------------------------------------------- types and bounds (issue 17)

@pytest.mark.parametrize("data, message", [
    ({"causal": "no"}, "causal: must be true or false, got 'no'"),
    ({"general_vocabulary": 1}, "general_vocabulary: must be true or false, got 1"),
    ({"batch_size": "abc"}, "batch_size: must be an integer, got 'abc'"),
    ({"sae": {"batch_size": 1.5}}, "sae.batch_size: must be an integer, got 1.5"),
    ({"sae": {"batch_size": "abc"}}, "sae.batch_size: must be an integer, got 'abc'"),
    ({"n_references": True}, "n_references: must be an integer, got true"),
    ({"sae": 5}, "sae: must be a JSON object of options, got 5"),
    ({"sae": None}, "sae: must be a JSON object of options, got null"),
    ({"seed": 10 ** 30}, "seed: must be at most 4294967295, got 1000000000000000000000000000000"),
    ({"sae": {"seed": -1}}, "sae.seed: must be at least 0, got -1"),
    ({"flag_min_share": "0.1"}, "flag_min_share: must be a number, got '0.1'"),
    ({"harm_min_z": float("inf")}, "harm_min_z: must be a finite number, got inf"),
    ({"device": "gpu"}, "device: must be auto, cpu, mps, cuda or cuda:<index>, got 'gpu'"),
    ({"expected_concepts": {"melanoma": [3]}}, "expected_concepts['melanoma'][0]: must be a string, got 3"),
    ({"class_prompts": {"nevus\x00": ["a mole"]}},
     "class_prompts['nevus\\x00'] (the class name): must not contain a NUL character"),
])
def test_an_option_of_the_wrong_type_or_range_is_refused_with_a_message_naming_it(data, message):
    with pytest.raises(EngineError) as err:
        AuditConfig.from_dict(data)
    assert err.value.message == message


@pytest.mark.parametrize("data, shown", [("text", "'text'"), (7, "7"), ([], "a list"), ([{"seed": 1}], "a list")])
def test_a_config_that_is_not_a_json_object_is_refused_not_read_as_the_defaults(data, shown):
    with pytest.raises(EngineError) as err:
        AuditConfig.from_dict(data)
    assert err.value.message == f"config must be a JSON object of options, got {shown}"


def test_every_problem_of_a_config_is_named_in_one_message():
    with pytest.raises(EngineError) as err:
        AuditConfig.from_dict({"causal": "no", "sae": {"k": 0}, "n_refs": 3})
    assert err.value.message.split("; ")[2:] == ["sae.k: must be at least 1, got 0",
                                                 "causal: must be true or false, got 'no'"]
    assert err.value.message.startswith("unknown option(s): n_refs; known options are: ")


def test_direct_construction_refuses_a_wrong_type_with_an_engine_error_too():
    with pytest.raises(EngineError, match="^sae.steps: must be an integer, got '10'$"):
        AuditConfig(sae={"steps": "10"})
    with pytest.raises(EngineError, match="^sae.batch_size: must be an integer, got 2.0$"):
        SAEConfig(batch_size=2.0)


def test_an_integer_option_refuses_a_whole_float_and_a_float_option_takes_an_integer():
    with pytest.raises(EngineError, match=r"^n_references: must be an integer, got 20.0$"):
        AuditConfig.from_dict({"n_references": 20.0})
    assert AuditConfig.from_dict({"harm_min_z": 2, "sae": {"lr": 1}}).harm_min_z == 2.0


def test_every_number_in_the_schema_has_an_upper_bound():
    schema = json_schema()
    numbers = {}
    for name, option in schema["properties"].items():
        for sub, nested in option.get("properties", {}).items():
            numbers[f"{name}.{sub}"] = nested
        numbers[name] = option
    numbers = {name: o for name, o in numbers.items() if o.get("type") in ("integer", "number")}
    assert {"seed", "batch_size", "n_references", "faithfulness_steps", "faithfulness_max_images",
            "top_images_per_flag", "report_top_n", "sae.n_latents", "sae.batch_size", "sae.steps",
            "sae.tokens_per_image", "harm_min_z"} <= set(numbers)
    assert [name for name, o in numbers.items() if "maximum" not in o] == []
    assert schema["properties"]["seed"]["maximum"] == 2 ** 32 - 1
    assert schema["properties"]["sae"]["type"] == "object" and schema["additionalProperties"] is False


def test_a_servers_bounds_tighten_the_schema_and_are_refused_naming_the_option_and_why():
    bounds = {"sae.n_latents": Bound(4096, "on this server (AUDIT_MAX_SAE_LATENTS)"),
              "n_references": Bound(32, "(the images of dataset 'lesions')")}
    assert json_schema(bounds)["properties"]["sae"]["properties"]["n_latents"]["maximum"] == 4096
    config = AuditConfig.from_dict({"sae": {"n_latents": 10 ** 9}, "n_references": 40})
    with pytest.raises(EngineError) as err:
        check_bounds(config, bounds)
    assert err.value.message == ("sae.n_latents: must be at most 4096 on this server (AUDIT_MAX_SAE_LATENTS), "
                                 "got 1000000000; n_references: must be at most 32 (the images of dataset "
                                 "'lesions'), got 40")
    with pytest.raises(EngineError, match="^n_references: must be at most 32"):
        AuditConfig.from_dict({"n_references": 33}, bounds)
    assert AuditConfig.from_dict({"n_references": 32}, bounds).n_references == 32  # a bound is inclusive
    check_bounds(AuditConfig(), bounds)  # n_latents left to the sizing is bounded by the sizing


def test_the_sae_training_memory_estimate_counts_adam_states_and_a_batch():
    # weights 2 x 1000 x 100 + 1000 + 100, four copies (weights, gradients, two Adam moments), and a batch of 10
    # through ~8 [batch, n_latents] and ~4 [batch, d_model] tensors, all float32
    assert SAEConfig(n_latents=1000, batch_size=10).training_bytes(100) == 4 * (4 * 201_100 + 10 * 8_400)
    # latents left to the sizing count as the most it picks, 4 x d_model
    assert SAEConfig(batch_size=10).training_bytes(250) == SAEConfig(n_latents=1000, batch_size=10).training_bytes(250)
