"""Pre-training data: an ImageFolder tree or the photographs bundled with scikit-image, with augmentation seeded
per (seed, epoch, index) and a sampler that can start in the middle of an epoch, so that a resumed run reads the
same crops in the same order as an uninterrupted one."""

from __future__ import annotations

import functools
import json
import zlib
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch.utils.data import Dataset, DistributedSampler

from greenmim_convert.errors import InvalidInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Photographs bundled in the scikit-image wheel (loaded from the installed package, never fetched). Grey-scale ones
# are repeated over three channels. Images that are mostly flat background (hubble, retina, moon) are left out:
# per-unit normalisation turns a flat unit's quantisation noise into an unpredictable unit-variance target.
DEMO_IMAGES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "stereo_motorcycle",
    "camera",
    "coins",
    "grass",
    "gravel",
    "brick",
    "cell",
    "clock",
    "page",
)


def sample_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (the same in every process and every run)."""
    return zlib.crc32(json.dumps(parts).encode()) * 2654435761 % (2**63 - 1)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start in the middle of an epoch and tags every index with its epoch, so that the
    dataset can seed each sample's augmentation by (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, rank: int, world: int, seed: int):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Next iteration: epoch ``epoch``, skipping its first ``start`` indices of this rank."""
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        order = list(super().__iter__())
        return iter([(i, self.epoch) for i in order[self.start :]])

    def __len__(self) -> int:
        return self.num_samples - self.start


class SeededAugment(Dataset):
    """Wraps a dataset of images: item ``(index, epoch)`` is augmented under the seed (seed, epoch, index)."""

    def __init__(self, base: Dataset, transform: Callable, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]) -> torch.Tensor:
        index, epoch = key
        item = self.base[index]
        image = item[0] if isinstance(item, tuple) else item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(image)


@functools.lru_cache(maxsize=4)
def load_demo_photos(max_side: int = 512) -> Tuple[torch.Tensor, ...]:
    """The photographs bundled with scikit-image as uint8 ``(3, H, W)`` tensors, the longer side at most
    ``max_side``; only files inside the installed wheel are read."""
    from torchvision.transforms.v2 import functional as TF

    try:
        import skimage.data as skdata
    except ImportError:
        raise InvalidInputError(
            "the built-in demo data needs scikit-image (pip install 'greenmim-convert[examples]'), or pass --data DIR"
        ) from None
    photos = []
    for name in DEMO_IMAGES:
        try:
            img = getattr(skdata, name)()
            img = torch.as_tensor(img[0] if isinstance(img, tuple) else img)
        except Exception:  # a sample scikit-image would have to download
            continue
        if img.dim() == 2:
            img = img[:, :, None].expand(-1, -1, 3)
        img = img[:, :, :3].permute(2, 0, 1).contiguous().to(torch.uint8)
        scale = max_side / max(img.shape[1:])
        if scale < 1:
            img = TF.resize(img, [round(img.shape[1] * scale), round(img.shape[2] * scale)], antialias=True)
        photos.append(img)
    if not photos:
        raise InvalidInputError("no scikit-image sample photograph could be read; pass --data DIR")
    return tuple(photos)


class DemoPhotos(Dataset):
    """``size`` items cycling over the scikit-image photographs; cropping happens in the transform."""

    def __init__(self, size: int, max_side: int = 512):
        self.photos = load_demo_photos(max_side)
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.photos[index % len(self.photos)]


def build_transform(img_size: Tuple[int, int], min_scale: float, tensor_input: bool) -> Callable:
    """RandomResizedCrop + horizontal flip + ImageNet normalisation (on PIL images or uint8 tensors)."""
    from torchvision.transforms import v2 as T

    steps = [] if tensor_input else [T.PILToTensor()]
    steps += [
        T.RandomResizedCrop(
            img_size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC, antialias=True
        ),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]
    return T.Compose(steps)


def build_dataset(
    data: Optional[str], img_size: Tuple[int, int], seed: int, demo_size: int = 1024, min_crop_scale: float = 0.2
) -> SeededAugment:
    """ImageFolder under ``data`` (labels ignored), else the scikit-image demo photographs; seeded augmentation."""
    if data:
        from torchvision.datasets import ImageFolder

        base: Dataset = ImageFolder(data)
        transform = build_transform(img_size, min_crop_scale, tensor_input=False)
    else:
        base = DemoPhotos(demo_size, max(512, 2 * max(img_size)))
        transform = build_transform(img_size, min_crop_scale, tensor_input=True)
    return SeededAugment(base, transform, seed)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images back to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device)[:, None, None]
    return (images * std + mean).clamp(0, 1)
