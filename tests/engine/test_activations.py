"""Activation extraction streams to disk in shards and reads back exactly."""
import numpy as np
import torch

from workers.engine.activations import ActivationStore, extract_activations
from workers.engine.data import TensorImages
from workers.engine.hooks import capture_residual


def _dataset(images):
    return TensorImages(images, [0, 1] * (len(images) // 2), ["a", "b"])


def test_extraction_writes_shards_that_read_back_the_stream(tiny, images, tmp_path):
    calls = []
    store = extract_activations(tiny, _dataset(images), tmp_path / "acts", layer=-2, batch_size=5, shard_size=4,
                                progress=lambda done, total: calls.append((done, total)))
    assert [s.count for s in store.shards] == [4, 4, 4]
    assert calls == [(5, 12), (10, 12), (12, 12)]
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
    (folder / "store.json").unlink()  # as if the worker died before finishing
    extract_activations(tiny, _dataset(images), folder, progress=lambda d, t: calls.append(d))
    assert calls[-1] == 12
    assert ActivationStore(folder).n == 12


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
