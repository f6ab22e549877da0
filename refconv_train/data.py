"""Data sets, transforms, samplers and loaders for ImageNet-layout folders (``root/<split>/<class>/*.jpg``).

Problems in the data are found before training starts where that is cheap (layout, empty classes, class count);
unreadable images can only be found when they are loaded, and are either fatal or skipped and counted.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from refconv_train.errors import RefconvError

try:  # deprecated in torchvision 0.29 in favour of TorchCodec (not a dependency): PIL decodes all once it is gone
    from torchvision.io import ImageReadMode, decode_image, read_file
except ImportError:  # pragma: no cover - depends on the torchvision version
    decode_image = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SLOTS = 1024  # bad-image counter slots: one per DataLoader worker (+1 for the main process)
log = logging.getLogger(__name__)


def build_transform(img_size: int, train: bool, crop_pct: float = 0.875, scale: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Callable:
    """The paper's recipe on ``uint8`` image tensors: random-resized crop (area fraction ``scale``, aspect ``ratio``,
    torchvision's and timm's defaults) + flip for training; resize to ``img_size / crop_pct`` + center crop for eval.
    Output stays ``uint8`` (3, img_size, img_size): workers send a quarter of the bytes, and
    :func:`normalize_images` converts and normalizes whole batches on the device.

    The eval resize matches timm's validate.py (shorter side to ``floor(img_size / crop_pct)``, bilinear with
    antialiasing, as PIL does), so our accuracies compare with published ones.
    """
    if img_size < 1 or not 0 < crop_pct <= 1:
        raise RefconvError(f"bad transform size: img_size={img_size}, crop_pct={crop_pct}: "
                           "use img_size >= 1 and 0 < crop_pct <= 1")
    bilinear = v2.InterpolationMode.BILINEAR
    if train:
        return v2.Compose([v2.RandomResizedCrop(img_size, scale=tuple(scale), ratio=tuple(ratio),
                                                interpolation=bilinear, antialias=True),
                           v2.RandomHorizontalFlip()])
    return v2.Compose([v2.Resize(int(math.floor(img_size / crop_pct)), interpolation=bilinear, antialias=True),
                       v2.CenterCrop(img_size)])


def normalize_images(images: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
                     std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """``uint8`` images (any layout) -> float32 ``(x / 255 - mean) / std``; float images are returned unchanged
    (already normalized by the caller's own pipeline)."""
    if images.is_floating_point():
        return images
    neg_shift, scale = _affine(tuple(mean), tuple(std), images.device, images.dim())
    return torch.addcmul(neg_shift, images, scale).contiguous(memory_format=_memory_format(images))


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
            dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(-mean / std, 1 / (255 std))`` on ``device``, made once: not a host-to-device copy for every batch."""
    shape = (1, -1, 1, 1) if dim == 4 else (-1, 1, 1)
    neg_shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=device).view(shape)
    scale = torch.tensor([1 / (255 * s) for s in std], device=device).view(shape)
    return neg_shift, scale


def _memory_format(images: torch.Tensor) -> torch.memory_format:
    if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


# Formats torchvision.io decodes (libjpeg-turbo, libpng, ...): faster than PIL per worker (docs/performance.md).
# Others (BMP, TIFF, PPM, ...) go through PIL.
TENSOR_DECODABLE = {".jpg", ".jpeg", ".png", ".gif", ".webp"}


def read_image(path: str) -> torch.Tensor:
    """An image file as a ``uint8`` RGB tensor (3, H, W): grayscale, palette, CMYK and alpha are converted."""
    if decode_image is not None and Path(path).suffix.lower() in TENSOR_DECODABLE:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    with Image.open(path) as image:
        return v2.functional.pil_to_tensor(image.convert("RGB"))


class BadImageError(RefconvError):
    """An image that cannot be decoded. Stays one line when re-raised from a DataLoader worker.

    DataLoader re-raises worker exceptions as ``type(e)("Caught ... Original Traceback ...")``; we recover the
    original one-line message from the traceback's last line so the CLI can still print ``error: <one line>``.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "BadImageError: " in message:
            message = message.rstrip().splitlines()[-1].split("BadImageError: ", 1)[1]
        super().__init__(message)


class CheckedImageFolder(ImageFolder):
    """ImageFolder that raises a one-line error naming an unreadable file, or skips it and counts the skip.

    With ``on_bad_image="skip"`` the next readable index (wrapping around) is returned instead, so the choice is
    deterministic. The count lives in a shared-memory tensor with one slot per worker: each process only writes its
    own slot (no lost updates, no locks), the main process sums them (``bad_images``), and it survives fork, spawn and
    persistent workers. Samples stay ``(image, target)`` so the engine needs no special case. Counts accumulate until
    ``reset_bad_images()``; with persistent workers an image that is bad is counted again on every epoch.
    """

    def __init__(self, root: str, transform: Callable | None, on_bad_image: str) -> None:
        super().__init__(root, transform=transform, loader=read_image)
        self.on_bad_image = on_bad_image
        self._bad = torch.zeros(_SLOTS, dtype=torch.int64).share_memory_()

    @property
    def bad_images(self) -> int:
        """Number of unreadable images skipped so far, over all worker processes."""
        return int(self._bad.sum())

    def reset_bad_images(self) -> None:
        self._bad.zero_()

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        """``key`` is an index, or ``(index, seed)`` from :class:`TrainSampler`: the augmentation of that sample then
        draws from its own seed, so it is the same whichever worker loads it and whether or not the run resumed."""
        if isinstance(key, tuple):
            index, seed = key
            # The CPU generator alone (what the transforms draw from): torch.manual_seed also seeds every
            # accelerator's generator, which dominated small images' loading time (docs/performance.md).
            generator = torch.default_generator
            state = generator.get_state()
            generator.manual_seed(seed)
            try:
                return self._load(index)
            finally:
                generator.set_state(state)  # with workers=0 this is the training process's own RNG
        return self._load(key)

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = self.loader(path)
            except Exception as exc:  # torchvision: RuntimeError; PIL: OSError, SyntaxError, DecompressionBomb...
                if self.on_bad_image == "error":
                    # PIL's messages repeat the path inside a file-object repr: keep the exception type only.
                    reason = type(exc).__name__
                    raise BadImageError(f"cannot read image '{path}' ({reason}): delete or replace "
                                        "it, or set on_bad_image='skip'") from None
                info = torch.utils.data.get_worker_info()
                self._bad[(0 if info is None else info.id + 1) % _SLOTS] += 1
                log.warning("skipping unreadable image %s (%s)", path, exc)
                continue
            if self.transform is not None:
                image = self.transform(image)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return image, target
        raise BadImageError(f"no readable image in '{self.root}': check the files or the data root")


def build_dataset(root: str | Path, split: str, transform: Callable | None, num_classes: int | None = None,
                  on_bad_image: str = "error") -> CheckedImageFolder:
    """ImageFolder over ``root/split`` after checking the layout, so that mistakes fail now, not hours into a run."""
    if on_bad_image not in ("error", "skip"):
        raise RefconvError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}: use one of them")
    layout = f"expected the ImageNet layout root/{split}/<class>/*.jpg"
    root = Path(root)
    if not root.is_dir():
        raise RefconvError(f"data root '{root}' does not exist: set data.root to a folder with train/ and val/")
    folder = root / split
    if not folder.is_dir():
        raise RefconvError(f"data root '{root}' has no '{split}' folder: {layout}")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise RefconvError(f"'{folder}' has no class folders: {layout}")
    for cls in classes:
        if not any(f.suffix.lower() in IMG_EXTENSIONS for f in cls.rglob("*") if f.is_file()):
            raise RefconvError(f"class folder '{cls}' has no images ({', '.join(IMG_EXTENSIONS)}): "
                               "add images or remove the folder")
    if num_classes is not None and num_classes != len(classes):
        raise RefconvError(f"'{folder}' has {len(classes)} class folders but the model has num_classes={num_classes}:"
                           f" set model.num_classes={len(classes)} (or fix the data)")
    return CheckedImageFolder(str(folder), transform, on_bad_image)


class TrainSampler(DistributedSampler):
    """DistributedSampler whose order depends only on (seed, epoch), also in a single process (exact resume).

    The caller should call ``set_epoch(epoch)``; if it does not, each new pass advances the epoch by itself, so
    epochs never silently repeat the same order.
    """

    def __init__(self, dataset: Dataset, world_size: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self._epoch_set = True
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._epoch_set = True

    def skip_next(self, samples: int) -> None:
        """Leave out the first ``samples`` of this rank's next pass (mid-epoch resume) without loading them."""
        self._skip = samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Yields ``(index, seed)``: the seed of that sample's augmentation in this epoch (see CheckedImageFolder)."""
        if not self._epoch_set:
            self.epoch += 1
        self._epoch_set = False
        skip, self._skip = self._skip, 0
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        return ((i, base + i) for i in itertools.islice(super().__iter__(), skip, None))


class ShardedEvalSampler(Sampler[int]):
    """Contiguous, unpadded shards: over all ranks every index appears exactly once.

    torchvision's DistributedSampler pads with duplicates so all ranks have equal length, which double-counts images
    in distributed evaluation. Ranks here may differ in length by one image (and by one batch), so evaluation must
    not run collectives per batch: evaluate the unwrapped model (``ddp.module``), then all-reduce the sums once.
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size or dataset_len < 0:
            raise RefconvError(f"bad eval shard: rank={rank}, world_size={world_size}, dataset_len={dataset_len}: "
                               "need 0 <= rank < world_size")
        self.start = dataset_len * rank // world_size
        self.stop = dataset_len * (rank + 1) // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def seed_worker(worker_id: int) -> None:
    """Seed ``random`` and numpy from torch's per-worker seed (itself derived from the loader's seeded generator)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(dataset: Dataset, batch_size: int, train: bool, workers: int, distributed: bool, rank: int,
                 world_size: int, seed: int, pin_memory: bool, drop_last: bool | None = None) -> DataLoader:
    """DataLoader for one process; ``batch_size`` is per process. ``drop_last`` defaults to ``train``.

    Training always shuffles through ``TrainSampler`` (world size 1 when not distributed); evaluation reads in order,
    sharded without padding when distributed. A seeded generator plus ``seed_worker`` make batches and augmentations
    reproducible for a given seed and worker count.
    """
    if batch_size < 1 or workers < 0:
        raise RefconvError(f"bad loader settings: batch_size={batch_size}, workers={workers}: "
                           "use batch_size >= 1 and workers >= 0")
    if not distributed:
        rank, world_size = 0, 1
    if train:
        sampler: Sampler[int] | None = TrainSampler(dataset, world_size, rank, seed)
    else:
        sampler = ShardedEvalSampler(len(dataset), rank, world_size) if distributed else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=train if drop_last is None else drop_last, persistent_workers=workers > 0,
                      worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed))
