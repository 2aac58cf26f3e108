"""TopK SAE: training on data with known sparse structure, the TopK rule, files and sizing."""
from contextlib import contextmanager

import pytest
import torch

from workers.engine.config import SAEConfig
from workers.engine.errors import EngineError
from workers.engine.sae import TopKSAE, evaluate_sae, init_from_sample, size_sae, train_sae

D_MODEL, N_VECTORS, N_ATOMS, ACTIVE_PER_VECTOR = 32, 4096, 64, 3
N_LATENTS, K, STEPS = 128, 4, 600


def sparse_data(seed: int = 0) -> torch.Tensor:
    """[4096, 32]: each row a non-negative mix of 3 of 64 random unit directions, plus small noise."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(N_ATOMS, D_MODEL, generator=gen)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    active = torch.rand(N_VECTORS, N_ATOMS, generator=gen).argsort(dim=1)[:, :ACTIVE_PER_VECTOR]
    coef = torch.zeros(N_VECTORS, N_ATOMS).scatter(1, active, 0.5 + torch.rand(N_VECTORS, ACTIVE_PER_VECTOR,
                                                                                 generator=gen))
    return coef @ atoms + 0.01 * torch.randn(N_VECTORS, D_MODEL, generator=gen)


def shuffled_batches(data: torch.Tensor, batch_size: int = 256, seed: int = 1):
    """Endless stream of shuffled batches; the same seed gives the same stream."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(data), generator=gen)
        for lo in range(0, len(data) - batch_size + 1, batch_size):
            yield data[order[lo:lo + batch_size]]


@contextmanager
def one_thread():
    """Matrices this small gain nothing from threads, and a busy 2-core CI box makes them crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(data, steps=STEPS, seed=0):
    with one_thread():
        return train_sae(shuffled_batches(data), d_model=D_MODEL, n_latents=N_LATENTS, k=K, steps=steps,
                         init_sample=data[:2048], config=SAEConfig(seed=seed, batch_size=256))


@pytest.fixture(scope="module")
def data():
    return sparse_data()


@pytest.fixture(scope="module")
def trained(data):
    return train(data)


def test_training_loss_curve_falls_below_half_its_start(trained):
    _, curve = trained
    steps = [s for s, _ in curve]
    assert steps[0] == 0 and steps[-1] == STEPS - 1
    assert steps == sorted(steps)
    assert curve[-1][1] < 0.5 * curve[0][1]


def test_trained_sae_explains_far_more_variance_than_its_untrained_start(data, trained):
    sae, _ = trained
    untrained = TopKSAE(D_MODEL, N_LATENTS, K)
    init_from_sample(untrained, data[:2048], seed=0)
    after = evaluate_sae(sae, data.split(512))
    before = evaluate_sae(untrained, data.split(512))
    assert after["fvu"] < 0.5 * before["fvu"]
    assert after["fvu"] < 0.3
    assert after["explained_variance"] == pytest.approx(1.0 - after["fvu"])
    assert after["mean_l0"] <= K
    assert 0.0 <= after["dead_fraction"] < 0.5


def test_evaluate_sae_fvu_matches_a_direct_computation(data, trained):
    sae, _ = trained
    with torch.no_grad():
        h_hat, _ = sae(data)
    direct_fvu = float((data - h_hat).pow(2).sum() / (data - data.mean(0)).pow(2).sum())
    direct_mse = float((data - h_hat).pow(2).sum(-1).mean())
    metrics = evaluate_sae(sae, data.split(1000))
    assert metrics["fvu"] == pytest.approx(direct_fvu, rel=1e-3)
    assert metrics["mse"] == pytest.approx(direct_mse, rel=1e-3)


def test_evaluate_sae_refuses_an_empty_pass(trained):
    sae, _ = trained
    with pytest.raises(EngineError, match="no activations"):
        evaluate_sae(sae, [])


def test_decoder_columns_have_unit_norm_after_training(trained):
    sae, _ = trained
    norms = sae.W_dec.norm(dim=0)
    assert norms.shape == (N_LATENTS,)
    assert float((norms - 1).abs().max()) < 1e-5
    assert torch.allclose(sae.dictionary.norm(dim=1), norms * sae.input_scale)


def test_training_returns_a_frozen_sae_in_eval_mode(trained):
    sae, _ = trained
    assert not sae.training
    assert all(not p.requires_grad for p in sae.parameters())


def handmade_sae(b_enc_value: float) -> TopKSAE:
    sae = TopKSAE(16, 32, 5)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(32, 16, generator=gen))
        sae.W_dec.copy_(torch.randn(16, 32, generator=gen))
        sae.normalize_decoder()
        sae.b_enc.fill_(b_enc_value)
    return sae.requires_grad_(False)


def test_topk_keeps_exactly_k_latents_when_the_kth_preactivation_is_positive():
    sae = handmade_sae(b_enc_value=100.0)  # every pre-activation is far above 0
    h = torch.randn(50, 16)
    pre = sae.pre_activations(h)
    assert bool((pre.topk(5, dim=-1).values[:, -1] > 0).all())
    z = sae.encode(h)
    assert ((z != 0).sum(-1) == 5).all()
    # The kept latents are the k largest pre-activations, with their values.
    top = pre.topk(5, dim=-1)
    assert torch.equal(z.gather(-1, top.indices), top.values)
    assert torch.equal(z.topk(5, dim=-1).indices.sort(-1).values, top.indices.sort(-1).values)


def test_topk_never_keeps_more_than_k_latents_and_drops_negative_ones():
    sae = handmade_sae(b_enc_value=-6.0)  # rows range from no positive pre-activation to more than k
    h = torch.randn(400, 16)
    positive = (sae.pre_activations(h) > 0).sum(-1)
    assert int(positive.max()) > 5 and int(positive.min()) < 5
    z = sae.encode(h)
    nonzero = (z != 0).sum(-1)
    assert int(nonzero.max()) == 5
    assert torch.equal(nonzero, positive.clamp_max(5))
    assert float(z.min()) >= 0.0
    assert z.shape == (400, 32)


def test_topk_sae_refuses_k_above_n_latents():
    with pytest.raises(EngineError, match="k=9, n_latents=8"):
        TopKSAE(4, 8, 9)
    with pytest.raises(EngineError):
        TopKSAE(4, 8, 0)


def test_training_is_deterministic_for_a_seed_and_differs_across_seeds(data):
    first, curve_a = train(data, steps=40, seed=7)
    second, curve_b = train(data, steps=40, seed=7)
    other, _ = train(data, steps=40, seed=8)
    assert torch.equal(first.W_dec, second.W_dec)
    assert torch.equal(first.W_enc, second.W_enc)
    assert curve_a == curve_b
    assert not torch.equal(first.W_dec, other.W_dec)


def test_training_reports_progress_and_fails_when_batches_run_dry(data):
    seen = []
    train_sae(shuffled_batches(data), d_model=D_MODEL, n_latents=N_LATENTS, k=K, steps=5,
              init_sample=data[:512], config=SAEConfig(seed=0), progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    with pytest.raises(EngineError, match="ran dry"):
        train_sae(iter(data[:512].split(256)), d_model=D_MODEL, n_latents=N_LATENTS, k=K, steps=3,
                  init_sample=data[:512], config=SAEConfig(seed=0))


def test_save_then_load_gives_the_same_encoding_and_decoding(tmp_path, data, trained):
    sae, _ = trained
    sae.save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["sae.json", "sae.safetensors"]
    loaded = TopKSAE.load(tmp_path / "sae")
    assert (loaded.d_model, loaded.n_latents, loaded.k) == (D_MODEL, N_LATENTS, K)
    assert float(loaded.input_scale) == float(sae.input_scale)
    h = data[:64]
    with torch.no_grad():
        z = sae.encode(h)
        assert torch.equal(loaded.encode(h), z)
        assert torch.equal(loaded.decode(z), sae.decode(z))


def test_loading_from_an_empty_folder_raises_engine_error(tmp_path):
    with pytest.raises(EngineError, match="cannot be read"):
        TopKSAE.load(tmp_path)


def test_size_sae_sizes_defaults_to_the_data():
    # one latent per 32 vectors (a power of two, at most 4 x d_model), k = n / 4, 30 passes within [600, 20 000]
    assert size_sae(48, 10000, SAEConfig()) == (192, 48, 1172)
    assert size_sae(96, 2000, SAEConfig()) == (64, 16, 600)  # the case study's 2 000 images
    n_latents, k, steps = size_sae(48, 100, SAEConfig())
    assert (n_latents, k, steps) == (16, 4, 600)  # never fewer than 16 latents or 600 steps
    # Large data: k stops at 64, steps at 20 000, latents at 4 x d_model.
    assert size_sae(4096, 10**6, SAEConfig(batch_size=1000)) == (16384, 64, 20000)


def test_size_sae_lets_explicit_config_values_win():
    assert size_sae(48, 10000, SAEConfig(n_latents=500, k=7, steps=123)) == (500, 7, 123)
    # Only n_latents given: k is derived from it.
    assert size_sae(48, 10000, SAEConfig(n_latents=640)) == (640, 64, 1172)
    assert size_sae(48, 10000, SAEConfig(n_latents=40)) == (40, 10, 1172)


@pytest.mark.parametrize("damage", ["corrupt_weights", "config_without_d_model", "config_is_a_list",
                                    "weights_of_another_shape"])
def test_a_damaged_saved_sae_is_refused_with_a_clear_error(tmp_path, damage):
    sae = TopKSAE(8, 16, 2)
    sae.save(tmp_path)
    if damage == "corrupt_weights":
        (tmp_path / "sae.safetensors").write_bytes(b"\x01\x02")
    elif damage == "config_without_d_model":
        (tmp_path / "sae.json").write_text('{"n_latents": 16, "k": 2, "input_scale": 1.0}')
    elif damage == "config_is_a_list":
        (tmp_path / "sae.json").write_text("[1, 2]")
    else:
        TopKSAE(8, 32, 2).save(tmp_path / "other")
        (tmp_path / "sae.safetensors").write_bytes((tmp_path / "other" / "sae.safetensors").read_bytes())
    with pytest.raises(EngineError, match="cannot be read"):
        TopKSAE.load(tmp_path)


def test_matryoshka_prefixes_are_an_eighth_a_quarter_and_half_of_the_latents():
    from workers.engine.sae import matryoshka_prefixes

    assert matryoshka_prefixes(256) == [32, 64, 128]
    assert matryoshka_prefixes(8) == [2, 4]  # a nested dictionary needs two latents at least
    assert matryoshka_prefixes(3) == []


def test_matryoshka_training_makes_its_first_latents_reconstruct_on_their_own(data):
    """The nested loss is what the variant changes: the first n/8 latents of a Matryoshka SAE explain the data far
    better alone than the first n/8 of a plain TopK SAE trained the same way, at a similar FVU for the whole."""
    def fvu(sae, m=None):
        with torch.no_grad():
            z = sae.encode(data)
            if m is not None:
                z[:, m:] = 0
            err = (data - sae.decode(z)).pow(2).sum()
        return float(err / (data - data.mean(0)).pow(2).sum())

    with one_thread():
        plain, _ = train_sae(shuffled_batches(data), d_model=D_MODEL, n_latents=N_LATENTS, k=K, steps=300,
                             init_sample=data[:2048], config=SAEConfig(seed=0))
        nested, _ = train_sae(shuffled_batches(data), d_model=D_MODEL, n_latents=N_LATENTS, k=K, steps=300,
                              init_sample=data[:2048], config=SAEConfig(seed=0, variant="matryoshka"))
    first = N_LATENTS // 8
    assert fvu(nested, first) < 0.8 * fvu(plain, first)
    assert fvu(nested) < 2 * fvu(plain) + 0.05


def test_an_unknown_sae_variant_is_refused_with_the_choices():
    with pytest.raises(Exception, match="matryoshka"):
        SAEConfig.from_dict({"variant": "gated"})
