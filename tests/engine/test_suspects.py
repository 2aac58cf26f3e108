"""Asking about a suspect: matching it by text, examples or a labels.csv column, its shares, harm and verdict."""
import numpy as np
import pytest
import torch

from workers.engine.config import AuditConfig
from workers.engine.errors import EngineError
from workers.engine.sae import TopKSAE
from workers.engine.suspects import (TEXT_MIN_READING, VERDICTS, Suspect, SuspectInputs, check_suspect, check_suspects,
                                     probe_shortcuts)

N, L = 400, 6
CONFIG = AuditConfig.from_dict({})


class _Store:
    def __init__(self, acts, embeddings=None):
        self.acts, self.n = acts, len(acts)
        self._embeddings = embeddings

    def embeddings(self):
        return self._embeddings

    def iter_batches(self, batch_size, start=0, stop=None):
        for lo in range(0, self.n, batch_size):
            yield lo, self.acts[lo:lo + batch_size], torch.zeros(len(self.acts[lo:lo + batch_size]), 2)

    def gather(self, indices):
        return self.acts[torch.as_tensor(indices)], torch.zeros(len(indices), 2)


def _identity_sae():
    sae = TopKSAE(L, L, L)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(L))
        sae.W_dec.copy_(torch.eye(L))
    return sae


def _probabilities(labels, ruler, shift, rng):
    """[n, 2]: melanoma's probability by the class (0.75 or 0.25, some noise), ``shift`` more with a ruler."""
    melanoma = np.clip(np.where(labels == 1, 0.75, 0.25) + rng.normal(0, 0.05, len(labels)) + shift * ruler, 0, 1)
    return np.stack([1 - melanoma, melanoma], 1)


def _inputs(probe_share_ruler=0.3, harmful=True, seed=0, ruler_shift=0.15):
    """Two classes; a ruler on half the images (latent 0 reads it), ink on a third (latent 1), a class latent (2).
    The probe calls every image with a ruler melanoma when ``harmful``; zero-shot goes by the class. Latent 0
    holds ``probe_share_ruler`` of melanoma's probe relevance and little of zero-shot's; a ruler gives an image
    ``ruler_shift`` more of melanoma's probability (its decision unchanged unless ``harmful``)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(N) % 2  # 0 nevus, 1 melanoma
    ruler = rng.random(N) < 0.5
    ink = rng.random(N) < 0.33
    acts = np.zeros((N, L), np.float32)
    acts[ruler, 0] = rng.uniform(1, 2, ruler.sum())
    acts[ink, 1] = rng.uniform(1, 2, ink.sum())
    acts[:, 2] = labels * rng.uniform(1, 2, N)
    acts[:, 3] = rng.uniform(0.1, 0.5, N)
    predicted = np.where(ruler, 1, labels) if harmful else labels.copy()
    shares = {"probe": np.full((2, L), 0.01), "zero_shot": np.full((2, L), 0.01)}
    shares["probe"][1, 0] = probe_share_ruler
    shares["zero_shot"][1, 0] = 0.02
    shares["probe"][1, 1] = shares["zero_shot"][1, 1] = 0.02  # ink: represented, hardly read
    semantic = torch.eye(L, 4)  # latent i's meaning: axis i (latents 4, 5 mean nothing)
    texts = {"a ruler": torch.tensor([1.0, 0, 0, 0]), "ink": torch.tensor([0, 1.0, 0, 0]),
             "a sticker": torch.tensor([0.05, 0.05, 0, 0.0])}

    def encode_text(words):
        return torch.stack([texts[w] for w in words]), torch.zeros(4)

    metadata = {"ruler": [str(int(v)) for v in ruler], "ink": [str(int(v)) for v in ink],
                "site": ["back"] * N}
    # what CLIP sees in each image, in the texts' space: a ruler on axis 0, ink on axis 1, the lesion on axis 3
    embeddings = np.stack([ruler, ink, np.zeros(N), np.ones(N)], 1) + rng.normal(0, 0.05, (N, 4))
    return SuspectInputs(_identity_sae(), _Store(torch.from_numpy(acts)), [f"img{i}.png" for i in range(N)],
                         labels, metadata, ["nevus", "melanoma"], {"probe": predicted, "zero_shot": labels.copy()},
                         shares, semantic, encode_text,
                         probabilities=_probabilities(labels, ruler, ruler_shift, rng),
                         embeddings=torch.tensor(embeddings, dtype=torch.float32)), ruler, ink


def _examples(ids, shows, n=10):
    ids = np.array(ids)
    return tuple(ids[shows][:n]), tuple(ids[~shows][:n])


def test_a_harmful_suspect_is_relied_on_harmful_for_its_class_by_text_column_and_examples():
    inputs, ruler, _ = _inputs()
    with_, without = _examples(inputs.ids, ruler)
    for suspect in (Suspect("ruler", text="a ruler"), Suspect("ruler", column="ruler"),
                    Suspect("ruler", with_images=with_, without_images=without)):
        answer = check_suspect(inputs, suspect, CONFIG)
        assert answer["match"]["latents"][0] == 0 and answer["match"]["found"], (suspect.kind, answer["match"])
        assert answer["verdict"] == "relied on, harmful" and answer["verdict_class"] == "melanoma", suspect.kind
        row = answer["classes"]["melanoma"]
        assert row["probe_share"] >= 0.3 and row["harm"]["measured"]
        assert row["harm"]["probe"]["called_gap"] > 0.9 and row["harm"]["split"] == "called_gap" and "melanoma images with it" in row["harm"]["summary"]
        assert answer["evidence"].startswith("latent 0" if answer["match"]["latents"] == [0] else "latents 0, ")
    column = check_suspect(inputs, Suspect("ruler", column="ruler"), CONFIG)
    assert column["present"] == {"images": int(ruler.sum()), "of": N, "how": "labels.csv column 'ruler'"}


def test_a_read_suspect_without_harm_and_a_represented_one_get_their_own_verdicts():
    inputs, ruler, ink = _inputs(harmful=False)
    read = check_suspect(inputs, Suspect("ruler", column="ruler"), CONFIG)
    assert read["verdict"] == "relied on, no measured harm"
    assert read["classes"]["melanoma"]["shift"]["moves"] and read["classes"]["melanoma"]["shift"]["probability"] > 0.1
    answer = check_suspect(inputs, Suspect("ink", column="ink"), CONFIG)
    assert answer["match"]["latents"] == [1] and answer["verdict"] == "represented, not relied on"
    # a share zero-shot gives alike is not reliance on the suspect (a mixed latent carries class signal)
    inputs.shares["zero_shot"][1, 0] = 0.3
    assert check_suspect(inputs, Suspect("ruler", column="ruler"), CONFIG)["verdict"] == VERDICTS[2]
    # nor is a share, however amplified, when the probe's output does not move with the suspect: a latent that
    # mixes it with what the probe reads
    still, _, _ = _inputs(harmful=False, ruler_shift=0.0)
    answer = check_suspect(still, Suspect("ruler", column="ruler"), CONFIG)
    assert answer["verdict"] == "represented, not relied on" and not answer["classes"]["melanoma"]["shift"]["moves"]
    assert answer["classes"]["melanoma"]["probe_share"] >= 0.3


def test_the_shift_weighs_the_class_and_the_others_and_needs_two_images_on_each_side():
    from workers.engine.suspects import presence_shift

    in_class = np.array([True] * 4 + [False] * 4)
    present = np.array([True, True, False, False] * 2)
    probability = np.array([0.9, 0.8, 0.6, 0.5, 0.45, 0.35, 0.15, 0.05])  # 0.3 more with it in both groups
    shift, z = presence_shift(probability, in_class, present)
    assert shift == pytest.approx(0.3) and z == pytest.approx(0.3 / (np.sqrt(2 * (0.005 / 2 + 0.005 / 2)) / 2))
    assert presence_shift(probability, in_class, np.array([True] + [False] * 7)) == (0.0, 0.0)


def test_a_suspect_the_dictionary_does_not_have_is_not_found_with_the_closest_match_as_evidence():
    inputs, ruler, _ = _inputs()
    answer = check_suspect(inputs, Suspect("sticker", text="a sticker"), CONFIG)
    assert answer["verdict"] == "not found by the dictionary" and not answer["match"]["found"]
    assert answer["match"]["score"] == pytest.approx(0.05) and "below the 0.1 a match needs" in answer["evidence"]
    # examples that nothing tells apart: random halves of the images
    ids = np.array(inputs.ids)
    noise = np.random.default_rng(1).random(N) < 0.5
    with_, without = _examples(ids, noise & ~ruler), _examples(ids, ~noise & ~ruler)
    answer = check_suspect(inputs, Suspect("noise", with_images=with_[0], without_images=without[0]), CONFIG)
    assert answer["verdict"] == "not found by the dictionary" and answer["match"]["score"] < 0.8


def test_bad_suspects_are_refused_saying_what_is_wrong():
    inputs, _, _ = _inputs()
    cases = [({"text": "x", "column": "ruler"}, "exactly one of"), ({"name": "x"}, "exactly one of"),
             ({"name": "x", "with": ["a", "b"], "without": ["c", "d", "e"]}, "at least 3 images with"),
             ({"name": "x", "with": ["a", "b", "c"], "without": ["a", "d", "e"]}, "both with and without"),
             ({"name": "x", "text": "x", "colour": "red"}, "unknown suspect field"), ("ruler", "must be an object"),
             ({"name": "", "text": ""}, "needs a name")]
    for given, words in cases:
        with pytest.raises(EngineError, match=words):
            Suspect.from_dict(given)
    with pytest.raises(EngineError, match="no column 'rulers' .*ink, ruler, site"):
        check_suspect(inputs, Suspect("r", column="rulers"), CONFIG)
    with pytest.raises(EngineError, match="must hold 0/1"):
        check_suspect(inputs, Suspect("r", column="site"), CONFIG)
    with pytest.raises(EngineError, match="'nope.png' is not in the audited dataset"):
        check_suspect(inputs, Suspect("r", with_images=("nope.png", "img1.png", "img2.png"),
                                      without_images=("img3.png", "img4.png", "img5.png")), CONFIG)
    with pytest.raises(EngineError, match="repeated: ruler"):
        check_suspects(inputs, [Suspect("ruler", text="a ruler"), Suspect("ruler", column="ruler")], CONFIG)


def test_a_suspect_round_trips_through_its_dict():
    for given in ({"name": "ruler", "text": "a ruler"}, {"name": "ink", "column": "ink"},
                  {"name": "tape", "with": ["a", "b", "c"], "without": ["d", "e", "f"]}):
        suspect = Suspect.from_dict(given)
        again = {k: v for k, v in suspect.to_dict().items() if k != "kind"}
        assert Suspect.from_dict(again) == suspect and suspect.to_dict()["kind"] in ("text", "column", "examples")


def test_the_images_that_show_a_suspect_are_those_clip_sees_it_in_not_all_those_its_latents_fire_on():
    # latent 0 mixes the ruler with ink, and ink is what the probe calls melanoma: on the images latent 0 fires on,
    # the ruler would look harmful; on those that show a ruler, it is not
    inputs, ruler, ink = _inputs(harmful=False, ruler_shift=0.0)
    acts = inputs.store.acts.clone()
    acts[torch.from_numpy(ink & ~ruler), 0] = 1.5
    inputs.store.acts = acts
    inputs.predictions["probe"] = np.where(ink, 1, inputs.labels)
    inputs.probabilities = _probabilities(inputs.labels, ink, 0.4, np.random.default_rng(3))
    answer = check_suspect(inputs, Suspect("ruler", text="a ruler"), CONFIG)
    assert answer["match"]["latents"] == [0] and answer["classes"]["melanoma"]["probe_share"] >= 0.3
    assert answer["match"]["by"] == "meaning"  # latent 0 fires on ink too: it does not follow CLIP's reading
    assert answer["present"] == {"images": int(ruler.sum()), "of": N,
                                 "how": "the audited CLIP's alignment of each image with 'a ruler' (Otsu split)"}
    assert answer["verdict"] == "represented, not relied on", answer["evidence"]
    assert answer["evidence"].endswith(f"; {int(ruler.sum())} of {N} images show it, by the audited CLIP's "
                                       "alignment of each image with 'a ruler' (Otsu split)")
    assert not answer["classes"]["melanoma"]["harm"]["measured"]
    # asked by examples, the images are those CLIP puts on the examples' side, not all those latent 0 fires on
    with_, without = _examples(inputs.ids, ruler & ~ink)[0], _examples(inputs.ids, ~ruler & ~ink)[0]
    by_examples = check_suspect(inputs, Suspect("ruler", with_images=with_, without_images=without), CONFIG)
    assert by_examples["match"]["latents"] == [0] and "nearer the examples with it" in by_examples["present"]["how"]
    assert by_examples["present"]["images"] == int(ruler.sum())
    assert by_examples["verdict"] == "represented, not relied on", by_examples["evidence"]
    # where CLIP sees every image alike, the latents' split stands
    inputs.embeddings = torch.ones(N, 4)
    for suspect in (Suspect("ruler", text="a ruler"), Suspect("ruler", with_images=with_, without_images=without)):
        assert check_suspect(inputs, suspect, CONFIG)["present"]["how"] == "the matched latents' activation (Otsu split)"
    # without image embeddings the latents decide, and the ink's harm lands on the ruler
    inputs.embeddings = None
    for suspect in (Suspect("ruler", text="a ruler"), Suspect("ruler", with_images=with_, without_images=without)):
        mixed = check_suspect(inputs, suspect, CONFIG)
        assert mixed["present"]["images"] == int((ruler | ink).sum()) and "latents" in mixed["present"]["how"]
        assert mixed["verdict"] == "relied on, harmful"


def test_an_examples_suspects_images_are_those_clip_puts_on_their_side_not_those_its_latents_split_off():
    # latent 0 reads the ruler but gives way where ink is (a TopK SAE keeps k latents per image), and ink is what the
    # probe calls melanoma: the latent's own split would hold the ruler images without ink, which the probe calls
    # nevus more often than the rest, so the ruler would look relied on for nevus
    inputs, ruler, ink = _inputs(harmful=False, ruler_shift=0.0)
    acts = inputs.store.acts.clone()
    acts[torch.from_numpy(ruler & ink), 0] = 0.0
    inputs.store.acts = acts
    inputs.predictions["probe"] = np.where(ink, 1, inputs.labels)
    inputs.probabilities = _probabilities(inputs.labels, ink, 0.4, np.random.default_rng(5))
    inputs.shares["probe"][0, 0] = 0.3  # latent 0 holds a large share of nevus's relevance too
    with_, without = _examples(inputs.ids, ruler & ~ink)[0], _examples(inputs.ids, ~ruler & ~ink)[0]
    suspect = Suspect("ruler", with_images=with_, without_images=without)
    answer = check_suspect(inputs, suspect, CONFIG)
    assert answer["match"]["latents"] == [0] and answer["match"]["found"]
    assert answer["present"]["images"] == int(ruler.sum()), answer["present"]  # ink or not
    assert answer["present"]["how"].startswith("the audited CLIP: each image's embedding nearer the examples")
    assert answer["verdict"] == "represented, not relied on", answer["evidence"]
    # the latent's split (what decides without image embeddings) leaves the ink out, and the ink's harm lands on
    # the ruler's absence
    inputs.embeddings = None
    split = check_suspect(inputs, suspect, CONFIG)
    assert split["present"]["images"] == int((ruler & ~ink).sum()) and "latents" in split["present"]["how"]
    assert split["verdict"] == "relied on, harmful" and split["verdict_class"] == "nevus", split["evidence"]


def test_an_examples_match_is_joined_by_the_latents_that_follow_clips_side_of_them_over_every_image():
    # latent 0 tells the twenty examples apart perfectly (1 on each ruler, also on a tenth of the other images, none
    # of them examples) but holds little of melanoma's probe relevance; latent 4 fires on every ruler, more or less,
    # and holds the share: on the examples alone the greedy match stops at latent 0
    inputs, ruler, _ = _inputs()
    rng = np.random.default_rng(2)
    stray = ~ruler & (rng.random(N) < 0.1)
    acts = inputs.store.acts.clone()
    acts[:, 0] = torch.from_numpy((ruler | stray).astype(np.float32))
    acts[:, 4] = torch.from_numpy(np.where(ruler, rng.uniform(0.5, 2, N), 0.0).astype(np.float32))
    inputs.store.acts = acts
    inputs.shares["probe"][1, 0], inputs.shares["probe"][1, 4] = 0.02, 0.3
    with_, without = _examples(inputs.ids, ruler)
    without = _examples(inputs.ids, ~ruler & ~stray)[0]
    answer = check_suspect(inputs, Suspect("ruler", with_images=with_, without_images=without), CONFIG)
    match = answer["match"]
    assert match["latents"] == [0, 4] and match["side"]["latents"] == [4] and match["found"], match
    assert match["side"]["correlation"] > 0.9 and match["score"] == 1.0
    assert answer["verdict"] == "relied on, harmful" and answer["classes"]["melanoma"]["probe_share"] >= 0.3
    assert "(latents 4 joined: they follow the side the audited CLIP puts the examples on" in answer["evidence"]
    # without CLIP's side (no image embeddings) the match is the examples' alone, and its share too small
    inputs.embeddings = None
    alone = check_suspect(inputs, Suspect("ruler", with_images=with_, without_images=without), CONFIG)
    assert alone["match"]["latents"] == [0] and "side" not in alone["match"]
    assert alone["verdict"] == "represented, not relied on"


def test_a_text_suspect_is_matched_by_the_latents_that_follow_clips_reading_of_it_not_only_by_their_meaning():
    # latent 0 fires on exactly the images with a ruler and the probe reads it, but its reference images look like
    # the lesion; latent 4 looks like a ruler and fires nowhere
    inputs, ruler, _ = _inputs()
    inputs.semantic = torch.eye(L, 4)[[3, 1, 2, 3, 0, 3]]
    encoded, encode = [], inputs.encode_text
    inputs.encode_text = lambda texts: encoded.append(list(texts)) or encode(texts)
    answer = check_suspect(inputs, Suspect("ruler", text="a ruler"), CONFIG)
    assert answer["match"]["by"] == "reading" and answer["match"]["latents"] == [0], answer["match"]
    assert encoded == [["a ruler"]]  # one encoding for the images that show it and the latents' meaning alike
    assert answer["match"]["score"] > 0.9 and answer["match"]["meaning"] == pytest.approx(1.0)
    assert answer["verdict"] == "relied on, harmful" and answer["verdict_class"] == "melanoma"
    assert answer["evidence"].startswith("latent 0: active mostly on the images the audited CLIP sees 'a ruler' in")
    # by meaning alone (no image embeddings to read the text with) latent 4 is all there is, and it is not read
    inputs.embeddings = None
    alone = check_suspect(inputs, Suspect("ruler", text="a ruler"), CONFIG)
    assert alone["match"]["by"] == "meaning" and alone["match"]["latents"] == [4]
    assert alone["verdict"] != "relied on, harmful"
    # a latent as active off the images CLIP sees the text in does not follow the reading: the meaning decides
    inputs, ruler, ink = _inputs()
    inputs.semantic = torch.eye(L, 4)[[3, 1, 2, 3, 0, 3]]
    acts = inputs.store.acts.clone()
    acts[torch.from_numpy(ink & ~ruler), 0] = 1.5
    inputs.store.acts = acts
    mixed = check_suspect(inputs, Suspect("ruler", text="a ruler"), CONFIG)
    assert mixed["match"]["by"] == "meaning" and mixed["match"]["latents"] == [4], mixed["match"]
    # a latent inside CLIP's reading that reproduces it only weakly (on three in five of its images) does not follow it
    inputs, ruler, _ = _inputs()
    inputs.semantic = torch.eye(L, 4)[[3, 1, 2, 3, 0, 3]]
    acts = inputs.store.acts.clone()
    acts[torch.from_numpy(ruler & (np.arange(N) % 5 < 2)), 0] = 0.0
    inputs.store.acts = acts
    assert CONFIG.match_min_correlation < np.corrcoef(acts[:, 0].numpy() > 0, ruler)[0, 1] < TEXT_MIN_READING
    weak = check_suspect(inputs, Suspect("ruler", text="a ruler"), CONFIG)
    assert weak["match"]["by"] == "meaning" and weak["match"]["latents"] == [4], weak["match"]
    # a text whose meaning no latent has is not found, whatever follows CLIP's reading of it
    inputs, ruler, _ = _inputs()
    inputs.semantic = torch.eye(L, 4)[[3, 1, 2, 3, 2, 3]]
    assert check_suspect(inputs, Suspect("ruler", text="a ruler"), CONFIG)["verdict"] == VERDICTS[3]


def _mostly_with(inputs, other, column, latent, rng):
    """A concept on 60 % of the images that show ``other`` and 10 % of the rest: its labels.csv ``column`` and its
    ``latent``'s activation (1 to 2 where it is, else 0) set on ``inputs``; returns where it is."""
    shows = np.where(other, rng.random(N) < 0.6, rng.random(N) < 0.1)
    inputs.metadata[column] = [str(int(v)) for v in shows]
    acts = inputs.store.acts.clone()
    acts[:, latent] = torch.from_numpy(np.where(shows, rng.uniform(1, 2, N), 0.0).astype(np.float32))
    inputs.store.acts = acts
    return shows


def test_a_suspect_relied_on_only_through_a_flagged_concept_it_goes_with_is_not_relied_on():
    # the probe calls every image with ink melanoma, a flagged concept (latent 1); rulers come mostly on images
    # with ink, so the images with a ruler are called melanoma more often, but not those without ink
    inputs, _, ink = _inputs(harmful=False, ruler_shift=0.0)
    rng = np.random.default_rng(7)
    ruler = _mostly_with(inputs, ink, "ruler", 0, rng)
    inputs.predictions["probe"] = np.where(ink, 1, inputs.labels)
    inputs.probabilities = _probabilities(inputs.labels, ink, 0.4, rng)
    assert abs(np.corrcoef(ruler, ink)[0, 1]) < CONFIG.match_min_correlation
    alone = check_suspect(inputs, Suspect("ruler", column="ruler"), CONFIG)
    assert alone["verdict"] == "relied on, harmful"  # nothing flagged: nothing to tell them apart
    inputs.shortcuts = [[1]]
    answer = check_suspect(inputs, Suspect("ruler", column="ruler"), CONFIG)
    row = answer["classes"]["melanoma"]
    assert answer["verdict"] == "represented, not relied on" and row["harm"]["measured"], answer["evidence"]
    assert row["explained_by"] == [1] and row["shortcuts"] == [{"latents": [1], "images": int((~ink).sum()),
                                                                 "relied_on": False}]
    assert "not its own: on the" in answer["evidence"] and "(latents 1) the probe does not rely on it" in \
        answer["evidence"]
    # a suspect harmful on its own stays so beside an unrelated shortcut, and is not checked against itself
    inputs, ruler, ink = _inputs()
    inputs.shortcuts = [[1], [0]]
    answer = check_suspect(inputs, Suspect("ruler", column="ruler"), CONFIG)
    row = answer["classes"]["melanoma"]
    assert answer["verdict"] == "relied on, harmful" and row["explained_by"] is None
    assert row["shortcuts"] == [{"latents": [1], "images": int((~ink).sum()), "relied_on": True}]


def _ruler_with_ink_on_its_images():
    """The probe calls every image with a ruler melanoma (harmful, latent 0); ink (latent 1, a share of its own)
    comes mostly on the images with a ruler, so the images with ink are called melanoma more often, but not those
    without a ruler. Nothing is flagged."""
    inputs, ruler, _ = _inputs(ruler_shift=0.4)
    ink = _mostly_with(inputs, ruler, "ink", 1, np.random.default_rng(11))
    inputs.shares["probe"][1, 1] = 0.1
    assert abs(np.corrcoef(ruler, ink)[0, 1]) < CONFIG.match_min_correlation
    return inputs, ruler, ink


def test_a_suspect_relied_on_only_through_another_suspect_of_the_list_is_not_relied_on():
    inputs, ruler, ink = _ruler_with_ink_on_its_images()
    alone = check_suspect(inputs, Suspect("ink", column="ink"), CONFIG)
    assert alone["verdict"] == "relied on, harmful", alone["evidence"]  # asked alone, nothing tells them apart
    listed = [Suspect("ink", column="ink"), Suspect("ruler", column="ruler")]
    ink_answer, ruler_answer = check_suspects(inputs, listed, CONFIG)
    row = ink_answer["classes"]["melanoma"]
    assert ink_answer["verdict"] == "represented, not relied on" and row["harm"]["measured"], ink_answer["evidence"]
    assert row["explained_by_suspect"] == "ruler" and not row["relied_on"]
    assert row["suspects"] == [{"suspect": "ruler", "images": int((~ruler).sum()), "relied_on": False}]
    assert "not its own: on the" in ink_answer["evidence"] and "without the suspect 'ruler'" in ink_answer["evidence"]
    # the ruler keeps its own reliance on the images without ink, and the order of the list does not matter
    assert ruler_answer["verdict"] == "relied on, harmful" and ruler_answer["classes"]["melanoma"]["relied_on"]
    assert ruler_answer["classes"]["melanoma"]["suspects"] == [{"suspect": "ink", "images": int((~ink).sum()),
                                                                "relied_on": True}]
    assert [a["verdict"] for a in check_suspects(inputs, listed[::-1], CONFIG)] == \
        [ruler_answer["verdict"], ink_answer["verdict"]]


def test_suspects_naming_the_same_concept_or_unrelated_ones_are_not_weighed_against_each_other():
    inputs, ruler, ink = _inputs()
    same = check_suspects(inputs, [Suspect("ruler", column="ruler"), Suspect("a ruler", text="a ruler"),
                                   Suspect("ink", column="ink")], CONFIG)
    assert [a["verdict"] for a in same] == ["relied on, harmful", "relied on, harmful", "represented, not relied on"]
    # the two rulers are one concept (their images alike), and ink is not relied on: nothing to weigh either against
    assert same[0]["classes"]["melanoma"]["suspects"] == [] and same[1]["classes"]["melanoma"]["suspects"] == []


def test_a_column_relied_on_is_so_even_where_no_latent_follows_it_well_enough_to_match():
    # latent 0 fires on only about half the images with a ruler: it holds the probe's share, but correlates with
    # the column below what a match needs. The column says which images show it, not the match
    inputs, ruler, _ = _inputs()
    rng = np.random.default_rng(3)
    half = ruler & (rng.random(N) < 0.45)
    acts = inputs.store.acts.clone()
    acts[:, 0] = torch.from_numpy(np.where(half, rng.uniform(1, 2, N), 0.0).astype(np.float32))
    inputs.store.acts = acts
    answer = check_suspect(inputs, Suspect("ruler", column="ruler"), CONFIG)
    assert not answer["match"]["found"] and answer["match"]["score"] < CONFIG.match_min_correlation
    assert answer["verdict"] == "relied on, harmful" and answer["verdict_class"] == "melanoma", answer["evidence"]
    assert f"below the {CONFIG.match_min_correlation} a match needs" in answer["evidence"]
    # not relied on, the same weak match is "not found"
    inputs.shares["probe"][1, 0] = 0.01
    assert check_suspect(inputs, Suspect("ruler", column="ruler"), CONFIG)["verdict"] == "not found by the dictionary"


def test_a_suspect_is_weighed_against_every_probe_flag_confirmed_or_not():
    # a flag without measured harm is still a concept the probe leans on; zero-shot's flags are not the probe's
    flags = [{"head": "probe", "latent": 1, "confirmation": {"status": "not_confirmed"}},
             {"head": "probe", "latent": 2, "concept_latents": [2, 5], "confirmation": {"status": "confirmed"}},
             {"head": "probe", "latent": 4},
             {"head": "zero_shot", "latent": 3, "confirmation": {"status": "confirmed"}}]
    assert probe_shortcuts(flags) == [[1], [2, 5], [4]]


def test_an_answer_names_the_images_that_show_the_suspect_most():
    inputs, ruler, _ = _inputs()
    answer = check_suspect(inputs, Suspect("ruler", text="a ruler"), CONFIG)
    top = [inputs.ids.index(i) for i in answer["top_images"]]
    strength = inputs.store.acts[:, 0].numpy()
    assert len(top) == 4 and all(ruler[i] for i in top)
    assert [strength[i] for i in top] == sorted(strength[ruler], reverse=True)[:4]


def test_uploaded_example_images_name_a_suspect_alone_or_beside_audited_ones():
    inputs, ruler, _ = _inputs()
    rng = np.random.default_rng(5)
    acts = np.zeros((10, L), np.float32)
    acts[:5, 0] = rng.uniform(1, 2, 5)  # five uploads show a ruler, five do not
    acts[:, 3] = rng.uniform(0.1, 0.5, 10)
    seen = np.stack([np.arange(10) < 5, np.zeros(10), np.zeros(10), np.ones(10)], 1) + rng.normal(0, 0.05, (10, 4))
    inputs.uploads = _Store(torch.from_numpy(acts), torch.tensor(seen, dtype=torch.float32))
    inputs.upload_ids = [f"upload:u{i}.png" for i in range(10)]
    codes = inputs.example_codes(["upload:u7.png", "img3.png", "upload:u0.png"], CONFIG)
    assert np.allclose(codes[[0, 2]], acts[[7, 0]]) and np.allclose(codes[1], inputs.store.acts[3].numpy())
    alone = Suspect("ruler", with_images=tuple(inputs.upload_ids[:5]), without_images=tuple(inputs.upload_ids[5:]))
    ids = np.array(inputs.ids)
    mixed = Suspect("ruler", with_images=(*inputs.upload_ids[:3], *ids[ruler][:3]),
                    without_images=(*inputs.upload_ids[5:8], *ids[~ruler][:3]))
    for suspect in (alone, mixed):
        answer = check_suspect(inputs, suspect, CONFIG)
        assert answer["match"]["latents"] == [0] and answer["match"]["found"]
        assert answer["verdict"] == "relied on, harmful" and answer["verdict_class"] == "melanoma"
    with pytest.raises(EngineError, match="'upload:u99.png' names no uploaded image"):
        check_suspect(inputs, Suspect("r", with_images=("upload:u99.png", "img1.png", "img2.png"),
                                      without_images=("img3.png", "img4.png", "img5.png")), CONFIG)


def test_a_checklist_on_a_finished_audit_reads_uploaded_examples_and_maps_its_top_images(tiny, probe, dataset,
                                                                                        tmp_path):
    from PIL import Image

    from .conftest import build_audit_config
    from workers.engine.pipeline import run_audit
    from workers.engine.suspects import run_checklist

    config = build_audit_config()
    result = run_audit(config, tiny, probe, dataset, workdir=tmp_path / "audit")
    uploads = {}
    for i in range(8):  # melanomas have a bright corner: four uploads with it, four without
        pixels = dataset[i][0].clone()
        pixels[:, :8, :8] = 2.5 if i < 4 else pixels[:, :8, :8] * 0
        uploads[f"u{i}.png"] = tmp_path / f"u{i}.png"
        Image.fromarray((pixels.clamp(-2.5, 2.5) / 5 + 0.5).mul(255).byte().permute(1, 2, 0).numpy()).save(
            uploads[f"u{i}.png"])
    tables = dict(np.load(tmp_path / "audit" / "relevance.npz"))
    references = [latent.get("references") or [] for latent in result.latents]
    from workers.engine.sae import TopKSAE

    sae = TopKSAE.load(tmp_path / "audit" / "sae")
    suspects = [Suspect("corner", with_images=tuple(f"upload:u{i}.png" for i in range(4)),
                        without_images=tuple(f"upload:u{i}.png" for i in range(4, 8))),
                Suspect("anything", text="a bright corner")]
    stages = []
    answers = run_checklist(tiny, probe, dataset, sae, tables, references, suspects, config,
                            workdir=tmp_path / "check", uploads=uploads,
                            progress=lambda stage, done, total: stages.append(stage))
    assert [a["name"] for a in answers] == ["corner", "anything"] and {"extract", "check"} <= set(stages)
    grid = tuple(int(g) for g in tiny.model.visual.grid_size)
    for answer in answers:
        assert answer["match"]["latents"] and answer["top_images"]
        assert set(answer["heatmaps"]) == set(answer["top_images"])
        for encoded in answer["heatmaps"].values():
            heat = np.asarray(encoded)
            assert heat.shape == grid and heat.max() == 255 and heat.min() >= 0
    with pytest.raises(EngineError, match="uploaded example images u0.png, u1.png, u2.png, u3.png, u4.png"):
        run_checklist(tiny, probe, dataset, sae, tables, references, suspects[:1], config,
                      workdir=tmp_path / "again", uploads={})


def test_a_list_kept_for_later_cannot_name_uploaded_images():
    from workers.engine.checklist import refuse_uploads

    uploaded = Suspect.from_dict({"name": "tape", "with": ["upload:a.png", "b", "c"], "without": ["d", "e", "f"]})
    assert uploaded.uploads == ["a.png"] and Suspect("ruler", text="a ruler").uploads == []
    with pytest.raises(EngineError, match="suspect 'tape': a project's saved checklist cannot name uploaded images"):
        refuse_uploads([Suspect("ruler", text="a ruler"), uploaded], "a project's saved checklist")
    with pytest.raises(EngineError, match="the audit option suspects cannot name uploaded images"):
        AuditConfig.from_dict({"suspects": [{"name": "tape", "with": ["upload:a.png", "b", "c"],
                                             "without": ["d", "e", "f"]}]})
