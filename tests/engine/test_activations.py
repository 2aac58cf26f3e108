"""Activation extraction streams to disk in shards and reads back exactly."""
import numpy as np
import pytest
import torch

from workers.engine.activations import (ActivationStore, assemble_store, extract_activations, extract_shard,
                                        plan_shards, shard_files)
from workers.engine.errors import EngineError
from workers.engine.data import TensorImages
from workers.engine.hooks import capture_residual


def _dataset(images):
    return TensorImages(images, [0, 1] * (len(images) // 2), ["a", "b"])


def test_extraction_writes_shards_that_read_back_the_stream(tiny, images, tmp_path):
    calls = []
    store = extract_activations(tiny, _dataset(images), tmp_path / "acts", layer=-2, batch_size=5, shard_size=4,
                                progress=lambda done, total: calls.append((done, total)))
    assert [s.count for s in store.shards] == [4, 4, 4]
    assert calls == [(4, 12), (8, 12), (12, 12)]  # shard by shard, batches never straddle a shard
    with capture_residual(tiny.model.visual, -2) as cap, torch.no_grad():
        emb = tiny.model.encode_image(images)
    assert store.item_shape == tuple(cap["h"].shape[1:])  # layer -2: every token is needed by the tail
    got = torch.cat([a for _, a, _ in store.iter_batches(5)])
    assert torch.allclose(got, cap["h"], atol=1e-6)
    assert torch.allclose(store.embeddings(), emb, atol=1e-6)
    acts, e = store.gather([11, 0, 5])
    assert torch.allclose(acts, cap["h"][[11, 0, 5]], atol=1e-6)
    assert store.labels.tolist() == [0, 1] * 6


def test_the_last_layer_with_cls_tokens_caches_only_the_cls_token(tiny, images, tmp_path):
    store = extract_activations(tiny, _dataset(images), tmp_path / "acts", layer=-1, token="cls")
    assert store.item_shape == (48,)
    spatial = extract_activations(tiny, _dataset(images), tmp_path / "sp", layer=-1, token="spatial")
    assert spatial.item_shape == (17, 48)


def test_a_finished_cache_is_reused_and_an_unfinished_one_is_redone(tiny, images, tmp_path):
    folder = tmp_path / "acts"
    extract_activations(tiny, _dataset(images), folder)
    calls = []
    extract_activations(tiny, _dataset(images), folder, progress=lambda d, t: calls.append(d))
    assert calls == []  # nothing recomputed
    (folder / "store.json").unlink()  # as if the worker died after its shards, before joining them
    extract_activations(tiny, _dataset(images), folder, progress=lambda d, t: calls.append(d))
    assert calls == []  # finished shards are kept
    assert ActivationStore(folder).n == 12


def test_only_unfinished_shards_are_redone(tiny, images, tmp_path):
    folder = tmp_path / "acts"
    first = extract_activations(tiny, _dataset(images), folder, shard_size=5)
    before = first.read(0, 12)[0]
    (folder / "store.json").unlink()
    (folder / shard_files(1)["done"]).unlink()  # shard 1 (images 5..9) was cut off before it finished
    (folder / ".acts-00001.npy.part").write_bytes(b"half")  # with a half-written file left behind
    calls = []
    store = extract_activations(tiny, _dataset(images), folder, shard_size=5,
                                progress=lambda d, t: calls.append(d))
    assert calls == [10]  # only shard 1's five images were read again
    assert torch.equal(store.read(0, 12)[0], before)


def test_shards_extracted_separately_and_joined_in_any_order_equal_one_pass(tiny, images, tmp_path):
    data = _dataset(images)
    whole = extract_activations(tiny, data, tmp_path / "whole", layer=-2)
    metas = [extract_shard(tiny, data, tmp_path / "sharded", i, start, count, layer=-2)
             for i, (start, count) in enumerate(plan_shards(12, 5))]
    assert [(m["start"], m["count"]) for m in metas] == [(0, 5), (5, 5), (10, 2)]
    store = assemble_store(tmp_path / "sharded", list(reversed(metas)))
    assert torch.allclose(store.read(0, 12)[0], whole.read(0, 12)[0], atol=1e-6)
    assert store.labels.tolist() == whole.labels.tolist()
    # batches are the same whatever the files: 4 + 4 + 4 over files of 5, 5 and 2 images
    assert [lo for lo, _, _ in store.iter_batches(4)] == [0, 4, 8]
    assert [lo for lo, _, _ in store.iter_batches(3, 4, 10)] == [4, 7]
    # the SAE's training stream does not depend on the files either
    take = lambda s: torch.cat([next(it) for it in [s.training_batches(6, 0, 4)] for _ in range(5)])
    assert torch.allclose(take(store), take(whole), atol=1e-6)


def test_shards_that_leave_a_gap_are_refused(tiny, images, tmp_path):
    data = _dataset(images)
    metas = [extract_shard(tiny, data, tmp_path, i, start, count) for i, (start, count) in
             enumerate(plan_shards(12, 5)) if i != 1]
    with pytest.raises(EngineError, match="gap or overlap at image 5"):
        assemble_store(tmp_path, metas)
    with pytest.raises(EngineError, match="at least 1 image"):
        plan_shards(12, 0)


def test_float16_caches_halve_the_disk_and_stay_close(tiny, images, tmp_path):
    s32 = extract_activations(tiny, _dataset(images), tmp_path / "a", layer=-2)
    s16 = extract_activations(tiny, _dataset(images), tmp_path / "b", layer=-2, cache_dtype="float16")
    size = lambda s: sum((s.folder / sh.acts).stat().st_size for sh in s.shards)
    assert size(s16) < 0.6 * size(s32)
    a32 = torch.cat([a for _, a, _ in s32.iter_batches(64)])
    a16 = torch.cat([a for _, a, _ in s16.iter_batches(64)])
    assert torch.allclose(a16, a32, rtol=2e-3, atol=2e-3)


def test_training_batches_cycle_and_sample_patch_tokens(tiny, images, tmp_path):
    store = extract_activations(tiny, _dataset(images), tmp_path / "sp", layer=-1, token="spatial")
    batches = store.training_batches(batch_size=50, seed=0, tokens_per_image=4)
    shapes = [next(batches).shape for _ in range(5)]  # 5 x 50 > 12 images x 4 tokens: it cycles
    assert shapes == [(50, 48)] * 5
    assert store.n_sae_vectors(4) == 48
    assert np.isfinite(store.sample(20, seed=0, tokens_per_image=4).numpy()).all()


def _rows_of(vectors: torch.Tensor) -> set:
    return {tuple(np.round(v, 4)) for v in vectors.numpy()}


def test_a_cls_only_cache_keeps_patch_tokens_for_its_sae_to_train_on(tiny, images, tmp_path):
    """sae.patch_tokens: the CLS SAE's training vectors are every CLS token and, per image, the patch tokens
    patch_picks draws, the same as a cache of every token would give; sharding does not change them."""
    from workers.engine.activations import patch_picks

    data = _dataset(images)
    store = extract_activations(tiny, data, tmp_path / "cls", layer=-1, token="cls", patch_tokens=3)
    assert store.item_shape == (48,) and store.patch_tokens == 3
    assert store.n_sae_vectors(16, patch_tokens=3) == 12 * 4
    assert store.n_sae_vectors(16) == 12  # patch_tokens 0: the CLS tokens alone
    full = extract_activations(tiny, data, tmp_path / "all", layer=-1, token="spatial")
    h = full.read(0, 12)[0]  # [12, 17, 48]
    expected = torch.cat([h[:, 0]] + [h[i, 1:][patch_picks(i, 16, 3)] for i in range(12)])
    epoch = torch.cat([next(it) for it in [store.training_batches(12, 0, 16, patch_tokens=3)] for _ in range(4)])
    assert _rows_of(epoch) == _rows_of(expected)  # one pass over 48 vectors, in batches of 12
    # sharded: the same kept tokens
    metas = [extract_shard(tiny, data, tmp_path / "sharded", i, start, count, patch_tokens=3)
             for i, (start, count) in enumerate(plan_shards(12, 5))]
    sharded = assemble_store(tmp_path / "sharded", metas)
    assert torch.allclose(sharded.gather_patches(np.arange(12)), store.gather_patches(np.arange(12)), atol=1e-6)
    assert len(store.sample(100, seed=0, tokens_per_image=16, patch_tokens=3)) == 48


def test_a_cache_without_kept_patch_tokens_trains_on_cls_tokens_alone(tiny, images, tmp_path):
    store = extract_activations(tiny, _dataset(images), tmp_path / "cls", layer=-1, token="cls")
    assert store.patch_tokens == 0 and not any(s.patches for s in store.shards)
    assert not list((tmp_path / "cls").glob("patches-*"))
    assert store.n_sae_vectors(16, patch_tokens=16) == 12
    assert next(store.training_batches(12, 0, 16, patch_tokens=16)).shape == (12, 48)


def test_a_cls_sae_at_an_earlier_layer_takes_its_patch_tokens_from_the_cache_of_every_token(tiny, images, tmp_path):
    from workers.engine.activations import patch_picks

    store = extract_activations(tiny, _dataset(images), tmp_path / "l2", layer=-2, token="cls", patch_tokens=3)
    assert store.item_shape == (17, 48) and store.patch_tokens == 0  # nothing kept apart: every token is there
    h = store.read(0, 12)[0]
    expected = torch.cat([h[:, 0]] + [h[i, 1:][patch_picks(i, 16, 3)] for i in range(12)])
    epoch = torch.cat([next(it) for it in [store.training_batches(12, 0, 16, patch_tokens=3)] for _ in range(4)])
    assert _rows_of(epoch) == _rows_of(expected)
