"""Training a tiny OpenCLIP model from scratch on the generated pre-training split (CPU is enough)."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .images import SIZE

LESION_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": SIZE, "patch_size": 8, "width": 96, "layers": 4, "head_width": 32,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def to_pixels(images: np.ndarray, preprocess_mean, preprocess_std) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> normalized float [n, 3, H, W], as the model's preprocess would give."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(preprocess_mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess_std).view(1, 3, 1, 1)
    return (x - mean) / std


# How people word an image of a lesion: a real CLIP has read many phrasings of the same scene, so prompts a user
# writes without knowing the training captions (``a photo of melanoma.``) still mean something to it.
PHRASINGS = ("a photo", "an image", "a close-up photo", "a picture", "a skin photo", "a clinical image")


def caption_variants(samples, seed: int = 0) -> list[list[str]]:
    """Per sample: the full caption, the class alone, the artifacts alone, each in the case's wording and in one
    other phrasing (with or without the article before the class).

    Training on all three teaches the text tower that "a dermoscopy image of a
    melanoma." and "a dermoscopy image with a ruler." are separate concepts,
    so either can be prompted alone.
    """
    rng = np.random.default_rng([seed, 7])
    out = []
    for s in samples:
        prefix = PHRASINGS[int(rng.integers(len(PHRASINGS)))]
        article = bool(rng.random() < 0.5)
        # the artifacts-alone caption of an image without artifacts is the bare "a dermoscopy image.": the empty
        # prompt then means "no artifact", which is what alignment subtracts (cos(e, t_c) - cos(e, t_empty))
        out.append([s.caption, s.partial_caption(True, False), s.partial_caption(False, True),
                    s.partial_caption(True, True, prefix, article), s.partial_caption(True, False, prefix, article),
                    s.partial_caption(False, True, prefix)])
    return out


@contextlib.contextmanager
def deterministic(threads: int = 2):
    """Torch as a rebuild on another machine runs it: ``threads`` intra-op threads (a reduction split over
    another number of threads sums in another order) and deterministic algorithms only; restored afterwards.
    The same code, seeds and CPU kind then give the same weights bit for bit; a model's SHA-256 says whether
    they did (:func:`workers.casestudy.build.model_digest`)."""
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def train_clip(bundle, images: np.ndarray, captions: list[list[str]], *, steps: int, batch_size: int = 128,
               lr: float = 1e-3, seed: int = 0, progress: Callable[[int, int, float], None] | None = None) -> list:
    """Contrastive (CLIP) training of ``bundle.model`` on images [n, H, W, 3] uint8 and their captions.

    ``captions[i]`` lists caption variants of image i; each step draws one at random.

    AdamW with a linear warm-up and cosine decay; horizontal flips as the only augmentation.
    Returns the loss curve as (step, loss) pairs.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = bundle.model
    model.train().requires_grad_(True)
    normalize = bundle.preprocess.transforms[-1]
    pixels = to_pixels(images, normalize.mean, normalize.std)
    variants = [bundle.tokenizer(v) for v in captions]  # per image [n_variants, context]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    n = len(pixels)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    curve = []
    start = time.monotonic()
    for step in range(steps):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + batch_size]
        cursor += batch_size
        x = pixels[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        img = F.normalize(model.encode_image(x), dim=-1)
        batch_tokens = torch.stack([variants[i][int(torch.randint(len(variants[i]), (1,), generator=gen))]
                                    for i in idx.tolist()])
        txt = F.normalize(model.encode_text(batch_tokens), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        # captions repeat (same class and artifacts): treat identical captions as positives, not negatives
        same = (batch_tokens.unsqueeze(1) == batch_tokens.unsqueeze(0)).all(-1).float()
        soft = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-soft * logits.log_softmax(1), 1).mean()
                      + torch.sum(-soft * logits.T.log_softmax(1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 20 == 0 or step == steps - 1:
            curve.append((step, loss.item()))
            if progress:
                progress(step + 1, steps, time.monotonic() - start)
    model.eval().requires_grad_(False)
    return curve
