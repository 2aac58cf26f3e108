"""Ask about a suspect: does the probe rely on a confounder the user names, whether or not the audit flagged it?

A suspect is named one of three ways (:class:`Suspect`):

- ``text`` ("a ruler"): the images that show it are those the audited CLIP itself aligns with the text (each
  image's embedding, split as below), not those the latents fire on: a latent that mixes the suspect with a
  concept the probe does read would put that concept's harm on the suspect. The latents are those that follow
  CLIP's reading (each active mostly on those images, their summed activation correlating with them at
  ``TEXT_MIN_READING``), found only when some latent's meaning (the mean embedding of its
  reference images) aligns with the text beyond the empty prompt (the alignment the labels use); where none
  follows the reading, those whose meaning is closest to the text. The latents whose references look most like
  the text need not be those the probe reads where the text is: the others are found by where they fire;
- ``examples``: a few images that show it and a few that do not (audited images by their ids, or uploaded ones
  named ``upload:NAME``, whose activations :func:`run_checklist` extracts apart): the latents whose summed
  activation best tells them apart, joined by those that best follow, over every audited image, the side CLIP
  puts them on (as a column's are found) and still tell the examples apart each on its own: a score or so of
  examples is told apart by one latent, while the concept is spread over more; the images that show it are those
  CLIP puts on the examples' side (each image
  embedding nearer the mean of the examples with it than of those without), not those the latents fire on: a
  latent that mixes the suspect with another concept, or gives way to it, picks images with more (or less) of
  that concept than the others have; without image embeddings, the latents' Otsu split;
- ``column``: a 0/1 column of ``labels.csv``: the latents whose summed activation correlates best with it, and
  the column itself says which images show the suspect.

For each suspect :func:`check_suspects` reports the latents that match it and how well, their share of each
class's relevance for the probe and for zero-shot, the harm table on the images that show it (the accuracy of
each head with and without it, as for a flag) and a verdict:

- ``relied on, harmful``: the probe gives it at least ``flag_min_share`` of a class's relevance and the harm is
  measured (as for a flag: significant, and the probe's own, beyond zero-shot's);
- ``relied on, no measured harm``: the share, without measured harm;
- either holds only when it still holds on the images without each of the audit's probe flags (each a concept
  the probe leans on, confirmed or not) that is not the suspect itself (:func:`_beyond_shortcuts`): otherwise the
  reliance is that flag's; and, asked in a list (:func:`check_suspects`), on the images without each other suspect
  relied on whose own reliance holds without this one's images (:func:`_beyond_suspects`);
- ``represented, not relied on``: the dictionary has it, the probe leaves it below the share;
- ``not found by the dictionary``: no latent matches it well enough; the evidence (the best match and how well
  it separates) says how close it came. A column relied on is so all the same (:data:`ALONE`).

Each answer also names the audited images that show the suspect most (``top_images``: the largest summed
activation of its latents among the images that show it) and :func:`attach_suspect_heatmaps` gives each a map of
where those latents are (their heatmaps summed, as the report's flags have them).

Usage, after an engine audit that kept its ``workdir``::

    inputs = SuspectInputs.from_audit(bundle, probe, images, result, workdir, config)
    answers = check_suspects(inputs, [Suspect("ruler", text="a ruler"), Suspect("ink", column="ink")], config)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .activations import ActivationStore
from .config import AuditConfig
from .correct_audit import presence_threshold
from .checklist import KINDS, MIN_EXAMPLES, UPLOAD, VERDICTS, Suspect  # noqa: F401 (the checklist's names, here too)
from .errors import EngineError
from .harm import auroc, measured_harm, subset_table, summary
from .columns import binary_column
from .directions import concept_groups
from .stability import (best_latents, best_match, concept_activity, correlated_latents, correlations,
                        pooled_activations)

TEXT_MIN_ALIGNMENT = 0.1  # a latent matches a text when its alignment (cos to the text - cos to "") is at least this
TEXT_WITHIN = 0.8  # ... and at least this fraction of the best latent's alignment ...
TEXT_MAX_LATENTS = 3  # ... at most this many (the closest)
# a latent follows CLIP's reading of a text when at least this share of the images it is active on (above its Otsu
# split) are images CLIP sees the text in: a latent that fires as much elsewhere mixes the text with another concept
TEXT_MIN_WITHIN = 0.8
TEXT_POOL = 32  # latents correlating best with CLIP's reading checked for that
# ... and their summed activation must correlate with the reading at least this well: a reading is CLIP's estimate,
# not the truth a column is, and where CLIP reads a text poorly the latents that best reproduce its errors are
# those of whatever it confuses the text with (a column's match needs ``match_min_correlation``, 0.6)
TEXT_MIN_READING = 0.7
EXAMPLES_MIN_AUROC = 0.8  # the matched latents must tell the examples with the suspect from those without this well
EXAMPLES_MIN_LATENT_AUROC = 0.65  # ... each of them at least this well on its own
CANDIDATES = 8  # latents tried when building a match
TOP_IMAGES = 4  # images shown (with heatmaps) per suspect: those that show it most
# the kinds whose images are the user's own truth, not a reading: a column. Relied on there (its matched latents
# holding the share, with measured harm or the output moving), a suspect is relied on even when those latents
# correlate with the column below what a match needs: the dictionary spreads the concept over more latents than a
# match holds, and the images that show it do not depend on the match. Text and examples are read by CLIP, and
# a reading the dictionary does not follow is one the audit cannot vouch for
ALONE = ("column",)


@dataclass
class SuspectInputs:
    """What checking suspects reads from a finished audit: the SAE and the audited images' cached activations,
    their ids, labels and ``labels.csv`` metadata, each head's predicted class per image and relevance share
    table ([classes, latents]), each latent's semantic embedding ([latents, embed]) and a text encoder (texts ->
    normalized [n, embed]; with the empty prompt's embedding) for text suspects."""

    sae: object
    store: ActivationStore
    ids: list[str]
    labels: np.ndarray
    metadata: Mapping[str, list[str]]
    class_names: list[str]
    predictions: dict[str, np.ndarray]
    shares: dict[str, np.ndarray]
    semantic: torch.Tensor | None = None
    encode_text: object = None
    device: str | torch.device = "cpu"
    uploads: ActivationStore | None = None  # the uploaded example images' activations, in ``upload_ids``' order
    upload_ids: list[str] = field(default_factory=list)  # "upload:NAME" per row of ``uploads``
    # the probe's class probabilities per image ([n, classes]); None: its predictions stand for them (0 or 1)
    probabilities: np.ndarray | None = None
    # the audited images' CLIP image embeddings ([n, E], the space ``encode_text`` embeds in): which images show a
    # text suspect; None: its matched latents decide, as for examples
    embeddings: torch.Tensor | None = None
    # the audit's probe flags (each the latents of one flag's concept, confirmed or not): a suspect is relied on
    # only when it still is on the images without each of them it is not (:func:`_beyond_shortcuts`)
    shortcuts: list[list[int]] = field(default_factory=list)
    _shortcut_presence: dict = field(default_factory=dict)
    _texts: dict = field(default_factory=dict)
    _index: dict = field(default_factory=dict)

    def index(self, image_id: str) -> int:
        if not self._index:
            self._index.update({str(i): k for k, i in enumerate(self.ids)})
        if image_id not in self._index:
            raise EngineError(f"image {image_id!r} is not in the audited dataset; name example images as labels.csv "
                              "names them")
        return self._index[image_id]

    def shortcut_presence(self, config: AuditConfig) -> np.ndarray:
        """[images, shortcuts]: which images show each of the audit's probe flags (its latents' summed activation
        above the Otsu split, as for a suspect)."""
        key = tuple(map(tuple, self.shortcuts))
        if key not in self._shortcut_presence:
            activity = concept_activity(self.sae, self.store, config, self.shortcuts, self.device)
            self._shortcut_presence[key] = np.stack(
                [activity[:, f] > presence_threshold(activity[:, f], include_zeros=True)
                 for f in range(len(self.shortcuts))], 1) if self.shortcuts else np.zeros((self.store.n, 0), bool)
        return self._shortcut_presence[key]

    def text_alignment(self, rows: torch.Tensor, text: str) -> np.ndarray:
        """[len(rows)] each row's alignment with ``text``: its cosine to the text minus its cosine to the empty
        prompt (the alignment the labels use), for latents' meanings and image embeddings alike; each text is
        encoded once."""
        if text not in self._texts:
            embedded, empty = self.encode_text([text])
            self._texts[text] = embedded[0].float(), empty.float()
        embedded, empty = self._texts[text]
        rows = torch.nn.functional.normalize(rows.float(), dim=-1)
        return (rows @ embedded - rows @ empty).numpy()

    def example_embeddings(self, image_ids: Sequence[str]) -> torch.Tensor | None:
        """[len(image_ids), E]: each example's CLIP image embedding (an ``upload:NAME`` from ``uploads``); None
        without the audited images' embeddings."""
        if self.embeddings is None:
            return None
        uploaded = {name: k for k, name in enumerate(self.upload_ids)}
        mine = [str(i).startswith(UPLOAD) for i in image_ids]
        theirs = self.uploads.embeddings() if any(mine) else None
        return torch.stack([theirs[_upload_row(uploaded, str(i))] if up else self.embeddings[self.index(str(i))]
                            for i, up in zip(image_ids, mine)]).float()

    def example_codes(self, image_ids: Sequence[str], config: AuditConfig) -> np.ndarray:
        """[len(image_ids), n_latents]: each example's SAE activation, pooled as the audit pools it; an id
        ``upload:NAME`` is an uploaded image (a row of ``uploads``), any other an audited image."""
        uploaded = {name: k for k, name in enumerate(self.upload_ids)}
        out = np.zeros((len(image_ids), self.sae.n_latents), np.float32)
        for store, pick in ((self.store, [(r, self.index(str(i))) for r, i in enumerate(image_ids)
                                          if not str(i).startswith(UPLOAD)]),
                            (self.uploads, [(r, _upload_row(uploaded, str(i))) for r, i in enumerate(image_ids)
                                            if str(i).startswith(UPLOAD)])):
            if pick:
                rows = [row for _, row in pick]
                codes = np.concatenate([z.cpu().numpy() for _, z in pooled_activations(
                    self.sae, _Subset(store, rows), config, self.device)])
                out[[r for r, _ in pick]] = codes
        return out

    @classmethod
    def from_audit(cls, bundle, probe, images, result, workdir: str | Path, config: AuditConfig,
                   device="cpu") -> "SuspectInputs":
        """From an engine audit (``run_audit``'s result or its dict) that kept ``workdir`` (activations, SAE,
        relevance tables)."""
        from .sae import TopKSAE

        workdir = Path(workdir)
        latents = result.latents if hasattr(result, "latents") else result["latents"]
        flags = result.flags if hasattr(result, "flags") else result["flags"]
        return cls.from_parts(bundle, probe, images.remap(probe.class_names), ActivationStore(workdir / "activations"),
                              TopKSAE.load(workdir / "sae", device), dict(np.load(workdir / "relevance.npz")),
                              [latent.get("references") or [] for latent in latents], config, device,
                              shortcuts=probe_shortcuts(flags))

    @classmethod
    def from_parts(cls, bundle, probe, images, store: ActivationStore, sae, tables: Mapping[str, np.ndarray],
                   references: Sequence[Sequence[str]], config: AuditConfig, device="cpu",
                   shortcuts: Sequence[Sequence[int]] = ()) -> "SuspectInputs":
        """From the audited images' activations (``store``, in ``images``' order), the audit's SAE, its relevance
        tables (``probe_share`` and ``zero_shot_share``, [classes, latents], as ``relevance.npz`` keeps them),
        each latent's reference images (their ids) and the audit's probe flags' concepts (:func:`probe_shortcuts`)."""
        from .heads import ZeroShotHead, encode_concepts
        from .semantics import semantic_embeddings

        embeddings = store.embeddings()
        zero_shot = ZeroShotHead.build(bundle, probe.class_names, config.prompt_templates, config.class_prompts)
        with torch.no_grad():
            logits = probe.cpu()(embeddings)
            predictions = {"probe": logits.argmax(1).numpy(), "zero_shot": zero_shot(embeddings).argmax(1).numpy()}
            probabilities = logits.float().softmax(1).numpy()
        index = {str(i): k for k, i in enumerate(images.ids)}
        m = max((len(r) for r in references), default=0)
        refs = torch.full((len(references), max(m, 1)), -1, dtype=torch.long)
        for i, ids in enumerate(references):
            found = [index[str(r)] for r in ids if str(r) in index]
            refs[i, :len(found)] = torch.tensor(found, dtype=torch.long)
        semantic, _, _ = semantic_embeddings(refs, (refs >= 0).float(), embeddings)

        def encode_text(texts):
            return (encode_concepts(bundle, list(texts), config.prompt_templates),
                    encode_concepts(bundle, [""], config.prompt_templates)[0])

        return cls(sae, store, [str(i) for i in images.ids], np.asarray(images.labels), images.metadata or {},
                   list(probe.class_names), predictions,
                   {"probe": np.asarray(tables["probe_share"]), "zero_shot": np.asarray(tables["zero_shot_share"])},
                   semantic, encode_text, device, probabilities=probabilities, embeddings=embeddings,
                   shortcuts=concept_groups(shortcuts))


def probe_shortcuts(flags: Sequence[Mapping]) -> list[list[int]]:
    """The latents of each probe flag's concept (``concept_latents``, else its latent), confirmed or not, from an
    audit's flags as the engine gives them: each is a concept the probe leans on, and a suspect whose images show
    more (or less) of it than the others would borrow its reliance. Confirmation asks for measured harm, which a
    concept can lack and still move the probe's output."""
    return [list(f.get("concept_latents") or [f["latent"]]) for f in flags if f.get("head") == "probe"]


def _upload_row(uploaded: dict, image_id: str) -> int:
    if image_id not in uploaded:
        raise EngineError(f"{image_id!r} names no uploaded image (uploaded: {', '.join(sorted(uploaded)) or 'none'}); "
                          "upload it with the checklist")
    return uploaded[image_id]


def run_checklist(bundle, probe, images, sae, tables: Mapping[str, np.ndarray], references: Sequence[Sequence[str]],
                  suspects: Sequence[Suspect], config: AuditConfig, *, workdir: str | Path,
                  progress=None, uploads: Mapping[str, str | Path] | None = None,
                  shortcuts: Sequence[Sequence[int]] = ()) -> list[dict]:
    """A checklist on a finished audit, as the service's short job runs it: the audited ``images``' activations
    extracted again (cached in ``workdir``), then :func:`check_suspects` and :func:`attach_suspect_heatmaps`.
    ``tables``, ``references`` and ``shortcuts``: see :meth:`SuspectInputs.from_parts`; ``uploads``: NAME -> file
    of each uploaded example image (named ``upload:NAME`` in a suspect's examples); ``progress(stage, done,
    total)`` reports "extract" and "check"."""
    from .activations import extract_activations
    from .data import ImageFiles
    from .loading import resolve_device
    from .pipeline import prepare_images

    report = progress or (lambda stage, done, total: None)
    device = resolve_device(config.device)
    bundle.model.to(device)
    sae = sae.to(device).eval().requires_grad_(False)
    prepared = prepare_images(bundle, probe, images)
    store = extract_activations(bundle, prepared, Path(workdir) / "activations",
                                progress=lambda done, total: report("extract", done, total), layer=config.layer,
                                token=config.token, batch_size=config.batch_size, device=device, dtype=config.dtype,
                                cache_dtype=config.cache_dtype)
    inputs = SuspectInputs.from_parts(bundle, probe, prepared, store, sae, tables, references, config, device,
                                      shortcuts)
    wanted = sorted({name for s in suspects for name in s.uploads})
    if wanted:
        missing = [name for name in wanted if name not in (uploads or {})]
        if missing:
            raise EngineError(f"the uploaded example images {', '.join(missing)} are missing; ask the checklist again "
                              "with them")
        files = ImageFiles([Path(uploads[name]) for name in wanted], [0] * len(wanted), probe.class_names[:1],
                           bundle.preprocess, ids=[UPLOAD + name for name in wanted])
        inputs.uploads = extract_activations(bundle, files, Path(workdir) / "uploads", layer=config.layer,
                                             token=config.token, batch_size=config.batch_size, device=device,
                                             dtype=config.dtype, cache_dtype=config.cache_dtype)
        inputs.upload_ids = list(files.ids)
    report("check", 0, len(suspects))
    answers = check_suspects(inputs, suspects, config)
    attach_suspect_heatmaps(bundle, sae, prepared, answers, config, device)
    report("check", len(suspects), len(suspects))
    return answers


def attach_suspect_heatmaps(bundle, sae, images, answers: list[dict], config: AuditConfig, device="cpu",
                            batch_size: int = 16) -> None:
    """Set ``answer["heatmaps"] = {image id: encoded map}`` on each answer's ``top_images``: where on the image
    its matched latents are (their maps, made as the audit's options say, summed and scaled to 0..255).
    ``images``: the audited images with the model's preprocessing, as the answers' ids name them."""
    from .heatmaps import encode_map, heatmaps_for

    index = {str(key): i for i, key in enumerate(images.ids)}
    wanted: dict[int, set[int]] = {}
    for answer in answers:
        for latent in answer["match"]["latents"]:
            wanted.setdefault(int(latent), set()).update(index[k] for k in answer.get("top_images") or [])
    wanted = {latent: sorted(rows) for latent, rows in wanted.items() if rows}
    maps = heatmaps_for(bundle, sae, config.layer, config.token, images, wanted, device=device,
                        batch_size=batch_size, method=config.heatmap_method, cells=config.heatmap_cells,
                        blocks=config.heatmap_blocks) if wanted else {}
    for answer in answers:
        summed = {}
        for key in answer.get("top_images") or []:
            grids = [maps[int(latent)][index[key]] for latent in answer["match"]["latents"]]
            summed[key] = encode_map(np.sum(grids, axis=0))
        answer["heatmaps"] = summed


def check_suspects(inputs: SuspectInputs, suspects: Sequence[Suspect], config: AuditConfig) -> list[dict]:
    """One answer per suspect (:func:`check_suspect`), in the order given."""
    names = [s.name for s in suspects]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise EngineError(f"suspect names must differ; repeated: {', '.join(repeated)}")
    answered = [_answer(inputs, s, config) for s in suspects]
    _beyond_suspects(inputs, suspects, answered, config)
    return [answer for answer, _ in answered]


def check_suspect(inputs: SuspectInputs, suspect: Suspect, config: AuditConfig, reading: bool = True) -> dict:
    """The checklist's row for one suspect, asked alone: ``match`` (latents, how well, ``found``), ``present``
    (images that show it and how that was decided), per class ``classes`` (probe and zero-shot share, harm tables,
    measured, relied on), and ``verdict`` with ``verdict_class`` (the class it is worst for) and ``evidence`` in
    words. ``reading`` False: a text suspect's latents are those closest in meaning only, as before they could
    follow CLIP's reading (the benchmark scores both side by side)."""
    return _answer(inputs, suspect, config, reading)[0]


def _answer(inputs: SuspectInputs, suspect: Suspect, config: AuditConfig,
            reading: bool = True) -> tuple[dict, np.ndarray | None]:
    """:func:`check_suspect`'s answer and the images that show the suspect (None: no latent to place it)."""
    seen = _seen(inputs, suspect)
    match = _match(inputs, suspect, config, seen if reading or not suspect.text else None)
    out = {**suspect.to_dict(), "match": match}
    if not match["latents"]:
        return {**out, "present": None, "top_images": [], "classes": {}, "verdict": VERDICTS[3],
                "verdict_class": None, "evidence": _evidence(suspect, match, None)}, None
    activity = concept_activity(inputs.sae, inputs.store, config, [match["latents"]], inputs.device)[:, 0]
    present, how = _shown(inputs, suspect, seen, activity)
    out["present"] = {"images": int(present.sum()), "of": int(len(present)), "how": how}
    shown = [int(i) for i in np.argsort(-activity, kind="stable") if present[i] and activity[i] > 0][:TOP_IMAGES]
    out["top_images"] = [inputs.ids[i] for i in shown]
    classes = {name: _class_row(inputs, match["latents"], present, c, name, config)
               for c, name in enumerate(inputs.class_names)}
    out["classes"] = classes
    return _judged(suspect, out), present


def _judged(suspect: Suspect, answer: dict) -> dict:
    """The answer with its verdict, the class it is about and the evidence, from its match and class rows."""
    verdict, worst = suspect_verdict(answer["match"], answer["classes"], alone=suspect.kind in ALONE)
    evidence = _evidence(suspect, answer["match"], answer["classes"][worst] if worst else None, answer["present"])
    return {**answer, "verdict": verdict, "verdict_class": worst, "evidence": evidence}


def _seen(inputs: SuspectInputs, suspect: Suspect) -> np.ndarray | None:
    """[images] the images the audited CLIP sees a text or examples suspect in (:func:`_text_presence`,
    :func:`_examples_presence`), read once for its match and for :func:`_shown`; None for a column, or where CLIP
    cannot say."""
    if suspect.text:
        return _text_presence(inputs, suspect.text)
    return _examples_presence(inputs, suspect) if suspect.kind == "examples" else None


def _shown(inputs: SuspectInputs, suspect: Suspect, seen: np.ndarray | None,
           activity: np.ndarray) -> tuple[np.ndarray, str]:
    """[images] which audited images show the suspect, and how that was decided: its column; for text, CLIP's
    reading of it (``seen``); for examples, the side of CLIP's embedding they are on (``seen``); else (no image
    embeddings, or CLIP sees the examples alike) its matched latents' summed ``activity`` above the Otsu split."""
    if suspect.column:
        return _column(inputs, suspect.column) > 0.5, f"labels.csv column {suspect.column!r}"
    if seen is not None and suspect.text:
        return seen, f"the audited CLIP's alignment of each image with {suspect.text!r} (Otsu split)"
    if seen is not None:
        return seen, ("the audited CLIP: each image's embedding nearer the examples with it than those without "
                      "(past the midpoint of the two groups' means)")
    return activity > presence_threshold(activity, include_zeros=True), "the matched latents' activation (Otsu split)"


def _class_row(inputs: SuspectInputs, latents: list[int], present: np.ndarray, c: int, name: str,
               config: AuditConfig) -> dict:
    shares = {head: round(float(inputs.shares[head][c, latents].sum()), 6) for head in ("probe", "zero_shot")}
    tables, measured, split, shift, z, moves, relied = _reliance(inputs, present, np.ones(len(present), bool), c,
                                                                shares, config)
    checked, explained_by = _beyond_shortcuts(inputs, present, c, shares, config) if relied else ([], None)
    harm = {**tables, "measured": measured, "split": split, "summary": summary(name, *tables.values())}
    return {"probe_share": shares["probe"], "zero_shot_share": shares["zero_shot"],
            "relied_on": relied and explained_by is None, "shortcuts": checked, "explained_by": explained_by,
            "suspects": [], "explained_by_suspect": None,
            "shift": {"probability": round(shift, 4), "z": round(z, 2), "moves": bool(moves)}, "harm": harm}


def _reliance(inputs: SuspectInputs, present: np.ndarray, keep: np.ndarray, c: int, shares: dict,
              config: AuditConfig) -> tuple:
    """On the images ``keep``: the harm tables, whether the harm is measured (and by which split), the shift of
    the class's probability with the suspect (its z, whether it moves) and whether the probe relies on it."""
    tables = {head: subset_table(present, keep, inputs.labels, inputs.predictions[head], c)
              for head in ("probe", "zero_shot")}
    measured, split = measured_harm(tables["probe"], tables["zero_shot"], config.harm_min_gap, config.harm_min_z)
    probability = (inputs.probabilities[:, c] if inputs.probabilities is not None
                   else (inputs.predictions["probe"] == c).astype(np.float64))
    shift, z = presence_shift(probability[keep], inputs.labels[keep] == c, present[keep])
    moves = shift >= config.harm_min_gap / 2 and z >= config.harm_min_z
    # relied on: a share a flag would need, and either harm the probe's own, or a share amplified over zero-shot's
    # (a mixed latent carries class signal both heads read alike: that is not reliance on the suspect) with the
    # probe's output moving with the suspect (a latent that mixes it with what the probe does read has the share,
    # but the images that show the suspect are then called the class no more often)
    relied = shares["probe"] >= config.flag_min_share and (
        measured or (shares["probe"] >= config.amplification_ratio * shares["zero_shot"] and moves))
    return tables, measured, split, shift, z, moves, relied


def _beyond_shortcuts(inputs: SuspectInputs, present: np.ndarray, c: int, shares: dict,
                      config: AuditConfig) -> tuple[list[dict], list[int] | None]:
    """Is the reliance the suspect's own, or that of a concept the audit flagged it goes with? The images that show
    a suspect can show more (or less) of a probe flag's concept than the others do: a latent that mixes the two
    picks them out so, CLIP can confuse the two, or the two go together in the data, and the probe's output moves
    on them for that concept. So the reliance is asked again on the images without each probe flag's concept
    (confirmed or not: one the probe leans on without measured harm still moves its output) that is not the
    suspect itself (their presences correlate below ``match_min_correlation``, the correlation a column match
    needs). Each check's flag latents, images and outcome; and the latents of the first flag without which the
    reliance is gone (None: it holds)."""
    shown = inputs.shortcut_presence(config)
    if shown.shape[1] == 0:
        return [], None
    alike = correlations(present.astype(np.float64), shown.astype(np.float64))
    checked, explained_by = [], None
    for f, latents in enumerate(inputs.shortcuts):
        if abs(alike[f]) >= config.match_min_correlation:
            continue  # the suspect itself (or its absence): nothing to tell apart
        keep = ~shown[:, f]
        holds = _reliance(inputs, present, keep, c, shares, config)[-1]
        checked.append({"latents": latents, "images": int(keep.sum()), "relied_on": bool(holds)})
        if not holds and explained_by is None:
            explained_by = latents
    return checked, explained_by


def _beyond_suspects(inputs: SuspectInputs, suspects: Sequence[Suspect],
                     answered: list[tuple[dict, np.ndarray | None]], config: AuditConfig) -> None:
    """Weigh each suspect relied on against the other suspects of the list relied on, as against the audit's probe
    flags (:func:`_beyond_shortcuts`): where its reliance is gone on the images without another's, while the
    other's still holds on the images without its own, the reliance was the other's (CLIP reads the two alike,
    or they go together in the data), and the answer says so (``explained_by_suspect``). Two suspects that are
    the same concept (presences correlating at ``match_min_correlation``) are not weighed; two that each need the
    other both stay relied on. Every comparison is made on the answers as asked alone, so the order of the list
    does not matter. Changes the answers in place."""
    relied = [sorted(name for name, row in answer["classes"].items() if row["relied_on"])
              if answer["verdict"] in VERDICTS[:2] else [] for answer, _ in answered]

    def holds(k: int, keep: np.ndarray, name: str) -> bool:
        answer, present = answered[k]
        row = answer["classes"][name]
        shares = {"probe": row["probe_share"], "zero_shot": row["zero_shot_share"]}
        return bool(_reliance(inputs, present, keep, inputs.class_names.index(name), shares, config)[-1])

    for i, (answer, present) in enumerate(answered):
        others = [j for j in range(len(answered)) if j != i and relied[j] and abs(correlations(
            present.astype(np.float64), answered[j][1].astype(np.float64)[:, None])[0])
            < config.match_min_correlation] if relied[i] else []
        for name in relied[i]:
            row, checks = answer["classes"][name], []
            for j in others:
                other = answered[j][1]
                mine = holds(i, ~other, name)
                checks.append({"suspect": suspects[j].name, "images": int((~other).sum()), "relied_on": mine})
                if not mine and row["explained_by_suspect"] is None and any(
                        holds(j, ~present, theirs) for theirs in relied[j]):
                    row["explained_by_suspect"] = suspects[j].name
            row["suspects"] = checks
            row["relied_on"] = row["relied_on"] and row["explained_by_suspect"] is None
        if any(answer["classes"][name]["explained_by_suspect"] for name in relied[i]):
            answered[i] = (_judged(suspects[i], answer), present)


def presence_shift(probability: np.ndarray, in_class: np.ndarray, present: np.ndarray) -> tuple[float, float]:
    """How much the images that show a suspect get more of a class's probability than those that do not, within
    the class's images and within the others' alike (each group weighted by its size), and its z (the difference
    over its standard error). (0, 0) when neither group has two images on each side."""
    shift = variance = weight = 0.0
    for group in (in_class, ~in_class):
        with_, without = probability[group & present], probability[group & ~present]
        if len(with_) < 2 or len(without) < 2:
            continue
        w = float(group.sum())
        shift += w * (with_.mean() - without.mean())
        variance += w * w * (with_.var(ddof=1) / len(with_) + without.var(ddof=1) / len(without))
        weight += w
    if weight == 0:
        return 0.0, 0.0
    shift, se = shift / weight, np.sqrt(variance) / weight
    return float(shift), float(shift / se) if se > 0 else (float("inf") if shift > 0 else 0.0)


def suspect_verdict(match: dict, classes: dict, alone: bool = False) -> tuple[str, str | None]:
    """The verdict and the class it is about: harmful reliance first, then the largest probe share. A suspect the
    dictionary does not find is "not found", unless ``alone`` (the images that show it are known without the
    dictionary: a column) and the probe relies on it there all the same."""
    if not match["found"] and not (alone and any(row["relied_on"] for row in classes.values())):
        return VERDICTS[3], None
    relied = {name: row for name, row in classes.items() if row["relied_on"]}
    harmful = {name: row for name, row in relied.items() if row["harm"]["measured"]}
    if harmful:
        return VERDICTS[0], max(harmful, key=lambda n: harmful[n]["probe_share"])
    if relied:
        return VERDICTS[1], max(relied, key=lambda n: relied[n]["probe_share"])
    return VERDICTS[2], max(classes, key=lambda n: classes[n]["probe_share"]) if classes else None


def _evidence(suspect: Suspect, match: dict, row: dict | None, present: dict | None = None) -> str:
    how = {"text": (f"active mostly on the images the audited CLIP sees {suspect.text!r} in, following them at "
                     f"correlation {match['score']:.2f} (meaning's alignment {match.get('meaning', 0):.3f})"
                     if match.get("by") == "reading" else f"alignment with {suspect.text!r} {match['score']:.3f}"),
           "examples": f"tells the examples apart with AUROC {match['score']:.2f}" + (
               f" (latents {', '.join(map(str, match['side']['latents']))} joined: they follow the side the audited "
               f"CLIP puts the examples on over every image, at correlation {match['side']['correlation']:.2f})"
               if match.get("side") else ""),
           "column": f"correlates with the column at {match['score']:.2f}"}[suspect.kind]
    if not match["latents"]:
        return f"no latent matches it ({match.get('reason', 'nothing close enough')})"
    found = "" if match["found"] else f", below the {match['needed']} a match needs"
    latents = match["latents"]
    text = f"latent{'s' if len(latents) > 1 else ''} {', '.join(map(str, latents))}: {how}{found}"
    if row is not None:
        shift = row.get("shift") or {}
        moved = (f", the probe's probability of the class {shift['probability']:+.2f} with it (z {shift['z']:.1f})"
                 if shift else "")
        text += (f"; probe share {row['probe_share']:.3f} (zero-shot {row['zero_shot_share']:.3f}){moved}; "
                 f"{row['harm']['summary']}")
        if row.get("explained_by"):
            without = next(x for x in row["shortcuts"] if x["latents"] == row["explained_by"])
            text += (f"; not its own: on the {without['images']} images without the audit's probe flag "
                     f"(latents {', '.join(map(str, row['explained_by']))}) the probe does not rely on it")
        elif row.get("explained_by_suspect"):
            without = next(x for x in row["suspects"] if x["suspect"] == row["explained_by_suspect"])
            text += (f"; not its own: on the {without['images']} images without the suspect "
                     f"{row['explained_by_suspect']!r} the probe does not rely on it, and on those without it the "
                     "probe still relies on that one")
    if present is not None:
        text += f"; {present['images']} of {present['of']} images show it, by {present['how']}"
    return text


# --------------------------------------------------------------------------- matching

def _match(inputs: SuspectInputs, suspect: Suspect, config: AuditConfig, seen: np.ndarray | None = None) -> dict:
    """The suspect's latents and how well they match; ``seen``: the images CLIP sees it in (:func:`_seen`), which a
    text's reading and an examples match's side follow."""
    if suspect.text:
        return _match_text(inputs, suspect.text, config, seen)
    if suspect.column:
        target = _column(inputs, suspect.column)
        if target.min() == target.max():
            return {"latents": [], "score": 0.0, "found": False, "needed": config.match_min_correlation,
                    "reason": f"column {suspect.column!r} has one value on every image"}
        rho, latents = best_latents(inputs.sae, inputs.store, config, target, inputs.device, CANDIDATES)
        return {"latents": latents, "score": round(float(rho), 4), "needed": config.match_min_correlation,
                "found": bool(latents) and rho >= config.match_min_correlation}
    return _match_examples(inputs, suspect, config, seen)


def _column(inputs: SuspectInputs, column: str) -> np.ndarray:
    return binary_column(inputs.metadata, column, "to name a suspect").astype(np.float64)


def _match_text(inputs: SuspectInputs, text: str, config: AuditConfig, seen: np.ndarray | None) -> dict:
    """A text suspect's latents: those that follow CLIP's reading of it (``seen``, :func:`_match_reading`) when
    the dictionary has its meaning at all and some do, else those whose meaning is closest (``by``: "reading" or
    "meaning")."""
    meaning = _match_meaning(inputs, text)
    reading = _match_reading(inputs, seen, config) if seen is not None and meaning["found"] else None
    if reading is None:
        return {**meaning, "by": "meaning"}
    return {**meaning, **reading, "meaning": meaning["score"], "by": "reading"}


def _match_reading(inputs: SuspectInputs, seen: np.ndarray, config: AuditConfig) -> dict | None:
    """The latents that follow CLIP's reading of a text (``seen``: the images it sees the text in): among the
    ``TEXT_POOL`` latents correlating best with it, those active (above their Otsu split) mostly on those images
    (``TEXT_MIN_WITHIN``), the set whose summed activation correlates best with it; None when that correlation is
    below ``TEXT_MIN_READING`` (or no latent is so placed)."""
    target = seen.astype(np.float64)
    top, columns = correlated_latents(inputs.sae, inputs.store, config, target, inputs.device, TEXT_POOL)
    within = []
    for k in range(len(top)):
        on = columns[:, k] > presence_threshold(columns[:, k], include_zeros=True)
        if on.any() and (seen & on).sum() / on.sum() >= TEXT_MIN_WITHIN:
            within.append(k)
    rho, chosen = best_match(target, columns[:, within[:CANDIDATES]])
    if not chosen or rho < TEXT_MIN_READING:
        return None
    return {"latents": [top[within[c]] for c in chosen], "score": round(float(rho), 4), "needed": TEXT_MIN_READING,
            "found": True}


def _match_meaning(inputs: SuspectInputs, text: str) -> dict:
    if inputs.semantic is None or inputs.encode_text is None:
        raise EngineError("text suspects need the latents' semantic embeddings and a text encoder")
    align = inputs.text_alignment(inputs.semantic, text)
    best = float(align.max()) if len(align) else 0.0
    chosen = [int(i) for i in np.argsort(-align)[:TEXT_MAX_LATENTS]
              if align[i] >= TEXT_MIN_ALIGNMENT and align[i] >= TEXT_WITHIN * best]
    return {"latents": chosen or [int(np.argmax(align))] if len(align) else [], "score": round(best, 4),
            "needed": TEXT_MIN_ALIGNMENT, "found": bool(chosen),
            "alignment": {str(i): round(float(align[i]), 4) for i in np.argsort(-align)[:CANDIDATES]}}


def _text_presence(inputs: SuspectInputs, text: str) -> np.ndarray | None:
    """[images] which images show a text suspect: those whose CLIP embedding aligns with the text (cosine to it
    minus cosine to the empty prompt) above the Otsu split. The matched latents do not decide this: a latent that
    mixes the suspect with another concept fires on that concept's images too, and the harm measured there would be
    the other concept's. None without image embeddings or when every image aligns alike."""
    if inputs.embeddings is None or inputs.encode_text is None:
        return None
    align = inputs.text_alignment(inputs.embeddings, text).astype(np.float64)
    if len(np.unique(align)) < 2:
        return None
    return align > presence_threshold(align, include_zeros=True)


def _examples_presence(inputs: SuspectInputs, suspect: Suspect) -> np.ndarray | None:
    """[images] the images CLIP itself puts on the examples' side: each image embedding projected on the mean of
    the examples with the suspect minus the mean of those without, past the midpoint of the two groups' means.
    These are the images that show an examples suspect, not those its matched latents fire on: a latent that mixes
    the suspect with another concept fires on that concept's images, and one that gives way to another concept
    (a TopK SAE keeps k latents per image) is silent on many of the suspect's images that show it; either way the
    other concept's share among the images differs from the rest, and the probe's output moves with it. None
    without image embeddings, or when the two groups' embeddings are alike on average."""
    given = inputs.example_embeddings([*suspect.with_images, *suspect.without_images])
    if given is None:
        return None
    given = torch.nn.functional.normalize(given, dim=-1)
    k = len(suspect.with_images)
    direction = given[:k].mean(0) - given[k:].mean(0)
    if not bool(direction.any()):
        return None
    cut = float((given[:k] @ direction).mean() + (given[k:] @ direction).mean()) / 2
    return (torch.nn.functional.normalize(inputs.embeddings.float(), dim=-1) @ direction).numpy() > cut


def _match_examples(inputs: SuspectInputs, suspect: Suspect, config: AuditConfig, side: np.ndarray | None) -> dict:
    target = np.array([1.0] * len(suspect.with_images) + [0.0] * len(suspect.without_images))
    codes = inputs.example_codes([*suspect.with_images, *suspect.without_images], config)  # [examples, latents]
    scores = np.array([auroc(codes[:, j], target > 0) or 0.5 for j in range(codes.shape[1])])
    # on a score or so of examples any latent can raise a correlation by chance: only latents clearly more active on
    # the images with it join a match (a concept spread over latents that each cover part of its images still joins)
    order = [int(j) for j in np.argsort(-scores)[:CANDIDATES] if scores[j] > 0.5]
    top = [j for j in order if scores[j] >= EXAMPLES_MIN_LATENT_AUROC] or order[:1]
    if not top:
        return {"latents": [], "score": 0.5, "found": False, "needed": EXAMPLES_MIN_AUROC,
                "reason": "no latent is more active on the images with it"}
    _, chosen = best_match(target, codes[:, top])
    latents = [top[j] for j in chosen]
    score = auroc(codes[:, latents].sum(1), target > 0) or 0.5
    match = {"latents": latents, "score": round(float(score), 4), "needed": EXAMPLES_MIN_AUROC,
             "found": score >= EXAMPLES_MIN_AUROC}
    return _follow_side(inputs, config, match, side, codes, target > 0) if match["found"] else match


def _follow_side(inputs: SuspectInputs, config: AuditConfig, match: dict, side: np.ndarray | None,
                 codes: np.ndarray, shows: np.ndarray) -> dict:
    """An examples match joined by the latents whose summed activation best follows ``side``, the side CLIP puts
    the examples on over every audited image (:func:`_examples_presence`, matched as a column is), each of which
    still tells the examples apart on its own (``EXAMPLES_MIN_LATENT_AUROC``): ``side`` gives them and that
    correlation. Twenty examples are told apart by one latent, and the greedy match stops there, while the
    concept is spread over more latents, whose share of the relevance is the concept's. The match's score and
    ``found`` stay those of the examples."""
    if side is None or side.all() or not side.any():
        return match
    rho, latents = best_latents(inputs.sae, inputs.store, config, side.astype(np.float64), inputs.device, CANDIDATES)
    joined = [j for j in latents if j not in match["latents"]
              and (auroc(codes[:, j], shows) or 0.5) >= EXAMPLES_MIN_LATENT_AUROC]
    if not joined:
        return match
    return {**match, "latents": match["latents"] + joined, "side": {"latents": joined, "correlation": round(rho, 4)}}


class _Subset:
    """The rows ``rows`` of an activation store, read as a store (``iter_batches``, ``n``)."""

    def __init__(self, store: ActivationStore, rows: list[int]):
        self.store, self.rows = store, rows
        self.n = len(rows)

    def iter_batches(self, batch_size: int, start: int = 0, stop: int | None = None):
        acts, embeddings = self.store.gather(np.asarray(self.rows))
        yield 0, acts, embeddings
