"""A synthetic person re-ID dataset, generated from a seed: P x K training batches and a query/gallery split.

Every identity is a structured pattern, so that both of RGA's relations carry signal: an upper and
a lower body colour split at an identity's waist height (regions), two to four coloured parts
(Gaussian blobs at identity-specific positions: a bag, a logo, shoes), and a stripe texture of
identity-specific orientation and frequency on one of the two regions. Colours come from a small
palette, so identities share them and differ in their arrangement. An image of an identity is that
pattern in the middle 60% of the width, on a background of its own, seen under a per-image lighting
change, a small shift and sensor noise.

Training batches follow the authors' sampler (P identities x K images each) and their
augmentations, in their order: random 2D translation (resize to 1.125x, then a random crop of the
original size, with probability 1/2), horizontal flip (probability 1/2), normalisation, then random
erasing (probability 1/2; area 2-40% of the image, aspect ratio 0.3-3.3, filled with 0, the mean of
the normalised data). Evaluation identities are disjoint from training ones, as in Market-1501:
each has one query image from camera 0 and ``gallery_per_id`` gallery images from cameras 1, 2, ...
(so torchreid's same-camera exclusion removes nothing), none augmented.

Everything is float32 on the CPU and comes from ``torch.Generator``s seeded by ``seed``: the same
seed gives the same images, bit for bit, and a model in another dtype gets the same values cast
(exactly, for float64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MEAN, STD = 0.45, 0.25      # per-pixel normalisation of the rendered [0, 1] images
PALETTE = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.6, 0.2], [0.15, 0.25, 0.85], [0.95, 0.85, 0.2],
                        [0.1, 0.1, 0.1], [0.9, 0.9, 0.9], [0.55, 0.35, 0.2], [0.5, 0.5, 0.55]])


@dataclass(frozen=True)
class Identity:
    """One identity's pattern parameters (all in [0, 1] image coordinates)."""

    upper: torch.Tensor          # (3,) colour above the waist
    lower: torch.Tensor          # (3,) colour below it
    waist: float                 # height of the split
    parts: torch.Tensor          # (P, 6): y, x, radius, r, g, b
    stripe_angle: float
    stripe_frequency: float      # cycles per image height
    stripe_region: int           # 0: upper body, 1: lower body


def make_identity(generator: torch.Generator) -> Identity:
    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(shape or (1,), generator=generator)

    def colour(n=1):     # a palette colour, slightly shifted: identities share colours, as people's clothes do
        picks = PALETTE[torch.randint(0, len(PALETTE), (n,), generator=generator)]
        return (picks + 0.08 * (torch.rand(n, 3, generator=generator) * 2 - 1)).clamp(0, 1)

    count = int(torch.randint(2, 5, (1,), generator=generator))
    parts = torch.cat([uniform(0.1, 0.9, count, 1), uniform(0.3, 0.7, count, 1), uniform(0.06, 0.14, count, 1),
                       colour(count)], dim=1)
    return Identity(upper=colour()[0], lower=colour()[0],
                    waist=float(uniform(0.35, 0.6)), parts=parts,
                    stripe_angle=float(uniform(0.0, math.pi)), stripe_frequency=float(uniform(3.0, 8.0)),
                    stripe_region=int(torch.randint(0, 2, (1,), generator=generator)))


def render(identity: Identity, height: int, width: int, generator: torch.Generator,
           shift: float = 0.04, noise: float = 0.05) -> torch.Tensor:
    """One (3, height, width) view of ``identity`` in [0, 1]: the person (the middle 60% of the width) on a
    random background (a colour gradient of the view's own), lighting, a shift of up to ``shift`` of the image
    per axis, Gaussian noise of standard deviation ``noise``."""
    dy, dx = ((torch.rand(2, generator=generator) * 2 - 1) * shift).tolist()
    y = (torch.arange(height, dtype=torch.float32) + 0.5) / height - dy
    x = (torch.arange(width, dtype=torch.float32) + 0.5) / width - dx
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    upper = (yy < identity.waist).float()
    image = identity.upper[:, None, None] * upper + identity.lower[:, None, None] * (1 - upper)
    phase = 2 * math.pi * identity.stripe_frequency * (yy * math.cos(identity.stripe_angle)
                                                       + 0.5 * xx * math.sin(identity.stripe_angle))
    region = upper if identity.stripe_region == 0 else 1 - upper
    image = image * (1 - 0.35 * region * (torch.sin(phase) > 0).float())
    for py, px, radius, *colour in identity.parts.tolist():
        weight = torch.exp(-(((yy - py) / radius) ** 2 + ((xx - px) / (0.5 * radius)) ** 2))
        image = image * (1 - weight) + torch.tensor(colour)[:, None, None] * weight
    gain = 0.8 + 0.4 * torch.rand(1, generator=generator) + 0.1 * torch.rand(3, 1, 1, generator=generator)
    person = ((xx - 0.5).abs() < 0.3).float()
    background = (torch.rand(3, 1, 1, generator=generator) * (1 - yy) + torch.rand(3, 1, 1, generator=generator) * yy)
    image = image * person + background * (1 - person)
    image = image * gain + noise * torch.randn(3, height, width, generator=generator)
    return image.clamp(0, 1)


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - MEAN) / STD


def random_translation(image: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """The authors' Random2DTranslation: with probability ``p``, resize to 1.125x and crop the original size."""
    if float(torch.rand(1, generator=generator)) >= p:
        return image
    _, h, w = image.shape
    big_h, big_w = int(round(h * 1.125)), int(round(w * 1.125))
    big = F.interpolate(image[None], size=(big_h, big_w), mode="bilinear", align_corners=False)[0]
    top = int(torch.randint(0, big_h - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, big_w - w + 1, (1,), generator=generator))
    return big[:, top:top + h, left:left + w]


def random_flip(image: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    return image.flip(-1) if float(torch.rand(1, generator=generator)) < p else image


def random_erasing(image: torch.Tensor, generator: torch.Generator, p: float = 0.5, area=(0.02, 0.4),
                   aspect: float = 0.3, value: float = 0.0) -> torch.Tensor:
    """Random erasing (Zhong et al.; torchreid's RandomErasing): with probability ``p`` one rectangle of
    ``area`` of the image and aspect ratio in [``aspect``, 1/``aspect``] set to ``value`` (100 tries)."""
    if float(torch.rand(1, generator=generator)) >= p:
        return image
    _, h, w = image.shape
    for _ in range(100):
        target = float(area[0] + (area[1] - area[0]) * torch.rand(1, generator=generator)) * h * w
        ratio = float(aspect + (1 / aspect - aspect) * torch.rand(1, generator=generator))
        eh, ew = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < eh < h and 0 < ew < w:
            top = int(torch.randint(0, h - eh + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - ew + 1, (1,), generator=generator))
            image = image.clone()
            image[:, top:top + eh, left:left + ew] = value
            return image
    return image


def augment(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The authors' training transform on one [0, 1] image: translation, flip, normalise, erasing."""
    image = random_flip(random_translation(image, generator), generator)
    return random_erasing(normalise(image), generator)


@dataclass
class QueryGallery:
    """The evaluation split: normalised images, identity labels and camera ids."""

    query: torch.Tensor
    query_pids: torch.Tensor
    query_camids: torch.Tensor
    gallery: torch.Tensor
    gallery_pids: torch.Tensor
    gallery_camids: torch.Tensor


class SyntheticReID:
    """``num_train_ids`` training identities and ``num_test_ids`` disjoint evaluation identities.

    ``batches(steps, identities=P, instances=K)`` yields the training stream; ``query_gallery()``
    the evaluation split. Both are functions of ``seed`` alone.
    """

    def __init__(self, height: int = 64, width: int = 32, num_train_ids: int = 32, num_test_ids: int = 16,
                 gallery_per_id: int = 4, seed: int = 0):
        if num_train_ids < 2 or num_test_ids < 1 or gallery_per_id < 1:
            raise ValueError("need at least 2 training identities, 1 test identity and 1 gallery image per identity")
        self.height, self.width = height, width
        self.num_train_ids, self.num_test_ids, self.gallery_per_id = num_train_ids, num_test_ids, gallery_per_id
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.identities = [make_identity(generator) for _ in range(num_train_ids + num_test_ids)]

    @property
    def num_classes(self) -> int:
        return self.num_train_ids

    def batches(self, steps: int, identities: int = 4, instances: int = 4, seed: int | None = None,
                views_per_id: int | None = None):
        """``steps`` training batches ``(images (P*K, 3, H, W) float32, labels (P*K,) int64)``: P distinct
        training identities per batch, K augmented views of each, identity-major as the authors' sampler.

        A generator: each batch is made when asked for. Each image is a fresh view of its identity, or, with
        ``views_per_id``, one of that many views rendered once per identity (then only the augmentation is
        per image: rendering dominates at large sizes, 256 x 128 say)."""
        if identities > self.num_train_ids:
            raise ValueError(f"identities={identities} per batch > num_train_ids={self.num_train_ids}")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 1 if seed is None else seed)
        pool = None
        if views_per_id is not None:
            pool_generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 3)
            pool = [[render(self.identities[i], self.height, self.width, pool_generator) for _ in range(views_per_id)]
                    for i in range(self.num_train_ids)]
        for _ in range(steps):
            ids = torch.randperm(self.num_train_ids, generator=generator)[:identities]
            labels = ids.repeat_interleave(instances)
            if pool is None:     # render, augment, image by image (the order of the generator's draws)
                images = [augment(render(self.identities[int(i)], self.height, self.width, generator), generator)
                          for i in labels]
            else:
                picks = torch.randint(0, views_per_id, (len(labels),), generator=generator).tolist()
                images = [augment(pool[int(i)][k], generator) for i, k in zip(labels, picks)]
            yield torch.stack(images), labels

    def query_gallery(self) -> QueryGallery:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 2)
        query, gallery, q_pids, g_pids, g_cams = [], [], [], [], []
        for pid in range(self.num_train_ids, self.num_train_ids + self.num_test_ids):
            identity = self.identities[pid]
            query.append(render(identity, self.height, self.width, generator))
            q_pids.append(pid)
            for camera in range(1, self.gallery_per_id + 1):
                gallery.append(render(identity, self.height, self.width, generator))
                g_pids.append(pid)
                g_cams.append(camera)
        q_cams = torch.zeros(len(q_pids), dtype=torch.long)
        return QueryGallery(normalise(torch.stack(query)), torch.tensor(q_pids), q_cams,
                            normalise(torch.stack(gallery)), torch.tensor(g_pids), torch.tensor(g_cams))
