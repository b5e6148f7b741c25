"""Label-free views of the calibration images for reconstruction (``ReconSettings.augment``).

Reconstruction with learned weights fits every unit's output on the calibration images; extra views
of the same images (mirrored, shifted by a pixel or two — the augmentations vision models are trained
with) give it more distinct inputs without drawing more images. Each view's FP32 target is computed
from the view itself, so no label and no assumption of invariance is involved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from repapq_deploy.errors import ConfigError, DeployError

SHIFT = 2  # pixels, as the reference models' training augmentation


def _hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x.flip(-1)


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by a seeded offset of up to :data:`SHIFT` pixels per axis; the border pixels
    are repeated into the gap (the background of a centred object)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (SHIFT,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * SHIFT + 1, (len(x), 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def _mixup(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image blended with a seeded partner from the same set, ``lam * x_i + (1 - lam) * x_j`` with
    ``lam`` uniform in [0.5, 1] (the image stays the dominant one): inputs between the calibration
    images, where the quantized model has to match FP32 too (mixup as in knowledge distillation's
    function matching)."""
    partner = torch.randperm(len(x), generator=generator)
    lam = (0.5 + 0.5 * torch.rand(len(x), generator=generator)).to(x.dtype).view(-1, *[1] * (x.dim() - 1))
    return lam * x + (1 - lam) * x[partner]


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "hflip": _hflip,
    "shift": _shift,
    "mixup": _mixup,
}


def augment(data: torch.Tensor, names: Sequence[str], seed: int) -> torch.Tensor:
    """``data`` followed by one view of it per name, applied cumulatively: ``("hflip", "shift")`` gives
    the images, their mirror images, and shifted copies of both (4x the images)."""
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ConfigError(f"`calib_augment` {','.join(unknown)}: unknown; choose from {', '.join(AUGMENTATIONS)}")
    if not names:
        return data
    if data.dim() != 4:
        raise DeployError(f"`calib_augment` needs image input (N, C, H, W); got shape {tuple(data.shape)}")
    generator = torch.Generator().manual_seed(seed)
    views = [data]
    for name in names:
        views += [AUGMENTATIONS[name](v, generator) for v in views]
    return torch.cat(views).contiguous()
