"""Attribution partials: the partials of shards merge into the partial of all the images, and survive a file."""
import numpy as np
import pytest
import torch

from workers.engine.activations import extract_activations
from workers.engine.context import AuditContext
from workers.engine.data import TensorImages
from workers.engine.errors import EngineError
from workers.engine.heads import LinearProbe
from workers.engine.partials import Partial, attribute_shard
from workers.engine.pipeline import extract_kwargs
from workers.engine.sae import TopKSAE

from .conftest import build_audit_config

CLASSES = ["nevus", "melanoma"]


@pytest.fixture
def shardable(tiny, tmp_path):
    """An attribution context over a random SAE and the activations of 30 images."""
    gen = torch.Generator().manual_seed(3)
    images = TensorImages(torch.randn(30, 3, 32, 32, generator=gen), [0, 1] * 15, CLASSES)
    config = build_audit_config(batch_size=8, faithfulness_max_images=6, faithfulness_steps=3)
    store = extract_activations(tiny, images, tmp_path / "acts", **extract_kwargs(config, "cpu"))
    sae = TopKSAE(store.d_model, 40, 4)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(40, store.d_model, generator=gen))
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(store.d_model, 40, generator=gen), dim=0))
    probe = LinearProbe(torch.randn(1, 32, generator=gen), torch.zeros(1), CLASSES)
    return AuditContext.build(config, tiny, probe, sae.eval().requires_grad_(False), torch.device("cpu")), store


def arrays(partial: Partial) -> dict:
    """Every array of a partial by a readable name."""
    out = {f: getattr(partial, f) for f in ("ref_values", "ref_indices", "frequency", "max_activation",
                                            "class_activation", "faith_counts", "active_count", "act_values",
                                            "act_indices")}
    for h, head in partial.heads.items():
        for f in ("relevance_sum", "top_values", "top_indices", "predictions"):
            out[f"{h} {f}"] = getattr(head, f)
        out.update({f"{h} curve {m}": c for m, c in head.curve_sum.items()})
        out.update({f"{h} harm {k}": v for k, v in head.harm.items()})
    return out


def test_the_partials_of_shards_merge_into_the_partial_of_all_images(shardable):
    ctx, store = shardable
    whole = attribute_shard(ctx, store, 0, 30)
    shards = [attribute_shard(ctx, store, start, min(7, 30 - start)) for start in range(0, 30, 7)]
    merged = Partial.merge(shards[::-1])  # in any order
    assert (merged.start, merged.count) == (0, 30)
    expected, got = arrays(whole), arrays(merged)
    assert set(expected) == set(got) and len(expected) == 9 + 2 * (4 + 5 + 4)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        if name == "ref_indices":  # a latent's references are the images it is active on; among zeros, any order
            active = whole.ref_values > 0
            value, got[name] = value[active], got[name][active]
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert (whole.ref_values > 0).any() and whole.heads["probe"].harm["score_total"].shape == (2,)


def test_a_partial_reads_back_from_its_file_as_it_was_written(shardable, tmp_path):
    ctx, store = shardable
    partial = attribute_shard(ctx, store, 7, 7)
    folder = tmp_path / "attribution"
    folder.mkdir()
    partial.save(folder / "partial-00001.npz")
    loaded = Partial.load(folder / "partial-00001.npz")
    assert (loaded.start, loaded.count) == (7, 7) and list(loaded.heads) == list(partial.heads)
    assert list(loaded.heads["probe"].curve_sum) == list(partial.heads["probe"].curve_sum)
    for name, value in arrays(partial).items():
        np.testing.assert_array_equal(arrays(loaded)[name], value, err_msg=name)
    assert [p.name for p in folder.iterdir()] == ["partial-00001.npz"]  # no half-written file left


def test_partials_that_leave_out_images_are_refused(shardable):
    ctx, store = shardable
    with pytest.raises(EngineError, match="attribution"):
        Partial.merge([attribute_shard(ctx, store, 0, 7), attribute_shard(ctx, store, 14, 7)])
