"""Image-caption pairs for text-to-image search: Flickr8k split by image, and their DataModule.

The held-out images are the fixed Flickr8k image split of `data.text.split_images` (shared with
the text-to-text `flickr8k_captions` task). Training items are the (image, caption) pairs of the
other images; `data.n` takes the first n pairs of a seeded permutation (nested across n).
Evaluation embeds each held-out image once and each held-out caption once; every caption queries
the held-out images (its own image is relevant) and every image queries the captions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from finetune_budget.data.base import BudgetDataModule, take_base_keys
from finetune_budget.data.text import read_flickr8k_captions, require_file, split_images
from finetune_budget.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class ImageTextData:
    """Training pairs (train_images[i], train_captions[i]) and the held-out split.

    eval_images: (M,) image files; eval_captions: (C,) texts; eval_caption_image: (C,) index into
    eval_images of each caption's image. No image appears on both sides.
    """

    name: str
    train_images: list[str]
    train_captions: list[str]
    eval_images: list[str]
    eval_captions: list[str]
    eval_caption_image: list[int]

    def __len__(self) -> int:
        return len(self.train_captions)


def load_flickr8k(
    path: str | Path, eval_images: int = 1000, eval_subset: int | None = None, **_: Any
) -> ImageTextData:
    """Flickr8k (`captions.txt` with `image,caption`, `images/`), split by image.

    eval_images: size of the fixed held-out image split (the study's split; >= 1,000 images).
    eval_subset: evaluate only the first k held-out images and their captions (quick runs and
    tests; the split itself does not change, so no training image enters evaluation).
    """
    folder = Path(path)
    frame = read_flickr8k_captions(folder)
    image_dir = require_file(folder / "images", "Flickr8k images folder (flickr8k/images/)")
    by_image = frame.groupby("image", sort=False)["caption"].apply(list)
    train_names, held_names = split_images(by_image.index.tolist(), int(eval_images))
    if eval_subset is not None:
        if not 1 < int(eval_subset) <= len(held_names):
            raise DataError(
                f"data.eval_subset={eval_subset} must lie between 2 and data.eval_images="
                f"{len(held_names)}, or be null"
            )
        held_names = held_names[: int(eval_subset)]
    train_images, train_captions = [], []
    for name in train_names:
        for caption in by_image[name]:
            train_images.append(str(image_dir / name))
            train_captions.append(str(caption))
    eval_captions, eval_caption_image = [], []
    for i, name in enumerate(held_names):
        for caption in by_image[name]:
            eval_captions.append(str(caption))
            eval_caption_image.append(i)
    missing = [
        p for p in [train_images[0], str(image_dir / held_names[0])] if not Path(p).exists()
    ]
    if missing:
        raise DataError(
            f"Flickr8k image {missing[0]} listed in captions.txt is missing; "
            "check that images/ holds the image files"
        )
    return ImageTextData(
        name="flickr8k",
        train_images=train_images,
        train_captions=train_captions,
        eval_images=[str(image_dir / n) for n in held_names],
        eval_captions=eval_captions,
        eval_caption_image=eval_caption_image,
    )


IMAGE_TEXT_LOADERS = {"flickr8k": load_flickr8k}


def load_image_text_data(data_cfg: dict[str, Any]) -> ImageTextData:
    """The data set a `conf/data/*.yaml` with an image-text `format` describes."""
    fmt = data_cfg.get("format")
    if fmt not in IMAGE_TEXT_LOADERS:
        raise DataError(
            f"data.format={fmt!r} is not an image-text format; use one of "
            f"{sorted(IMAGE_TEXT_LOADERS)} (e.g. data=flickr8k with task=text_image)"
        )
    return IMAGE_TEXT_LOADERS[fmt](**{k: v for k, v in data_cfg.items() if k != "format"})


def read_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
        raise DataError(
            f"image {path} could not be read ({type(e).__name__}); check the data folder"
        ) from e


class PairDataset(Dataset):
    """Item i -> {"image": (3, S, S) float, "caption": str, "index": id}; decoded and augmented
    in workers."""

    def __init__(
        self,
        images: list[str],
        captions: list[str],
        transform: Callable[[Image.Image], torch.Tensor],
        ids: list[int] | None = None,
    ) -> None:
        self.images, self.captions, self.transform = images, captions, transform
        self.ids = ids if ids is not None else list(range(len(captions)))

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "image": self.transform(read_image(self.images[i])),
            "caption": self.captions[i],
            "index": self.ids[i],
        }


class EvalDataset(Dataset):
    """Held-out images first (kind 0), then held-out captions (kind 1), each once."""

    def __init__(
        self, data: ImageTextData, transform: Callable[[Image.Image], torch.Tensor]
    ) -> None:
        self.data, self.transform = data, transform
        self.n_images = len(data.eval_images)

    def __len__(self) -> int:
        return self.n_images + len(self.data.eval_captions)

    def __getitem__(self, i: int) -> tuple[int, int, Any]:
        if i < self.n_images:
            return 0, i, self.transform(read_image(self.data.eval_images[i]))
        j = i - self.n_images
        return 1, j, self.data.eval_captions[j]


class ImageTextDataModule(BudgetDataModule):
    """Training batches {"image": (B, 3, S, S), "text": (B, T) token ids, "index": (B,)} of the
    first `n` pairs of a seeded permutation; eval batches of held-out images {"image", "index"} or
    captions {"text", "index"} (a batch holds one kind; captions sorted by length to keep padding
    small).
    """

    def __init__(
        self,
        data: ImageTextData | None,
        tokenizer: Callable[[list[str]], torch.Tensor],
        train_transform: Callable[[Image.Image], torch.Tensor],
        eval_transform: Callable[[Image.Image], torch.Tensor],
        **source: Any,
    ) -> None:
        """data: the loaded pairs, or None to load the ones `source` describes (the `data`
        group's other keys: format, path, eval_images, ...; load_image_text_data). The subset
        and loader keys (data.base.BASE_KEYS) go to the base."""
        base = take_base_keys(source, eval_batch_size=128)
        if data is None:
            data = load_image_text_data(source)
        super().__init__(len(data), name=f"{data.name} train pairs", **base)
        self.data = data
        self.tokenizer = tokenizer
        self.train_transform, self.eval_transform = train_transform, eval_transform
        # (C,) image index of each held-out caption: the relevance of both directions
        self.caption_image = torch.as_tensor(data.eval_caption_image)

    @property
    def n_eval_images(self) -> int:
        return len(self.data.eval_images)

    def collate_train(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "image": torch.stack([it["image"] for it in items]),
            "text": self.tokenizer([it["caption"] for it in items]),
            "index": torch.as_tensor([it["index"] for it in items]),
        }

    def collate_eval(self, items: list[tuple[int, int, Any]]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor([i for _, i, _ in items])
        if items[0][0] == 0:
            return {"image": torch.stack([x for _, _, x in items]), "index": index}
        return {"text": self.tokenizer([x for _, _, x in items]), "index": index}

    def train_dataloader(self) -> DataLoader:
        d = self.data
        items = self.subset.tolist()
        dataset = PairDataset(
            [d.train_images[i] for i in items],
            [d.train_captions[i] for i in items],
            self.train_transform,
            ids=items,
        )
        # in-batch negatives: no short last batch (a batch of one pair has no negative)
        return self.train_loader(dataset, self.collate_train, drop_last=True)

    def eval_batches(self) -> list[list[int]]:
        """Batches of EvalDataset positions: images in order, then captions by length."""
        n_img, bs = self.n_eval_images, self.eval_batch_size
        caps = self.data.eval_captions
        by_len = sorted(range(len(caps)), key=lambda j: len(caps[j]))
        image_batches = [list(range(s, min(s + bs, n_img))) for s in range(0, n_img, bs)]
        text_batches = [[n_img + j for j in by_len[s : s + bs]] for s in range(0, len(caps), bs)]
        return image_batches + text_batches

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(
            EvalDataset(self.data, self.eval_transform), self.collate_eval, self.eval_batches()
        )
