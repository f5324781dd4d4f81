"""Image transforms of the papers' recipes, with ImageNet normalisation.

- train: ``RandomResizedCrop(image_size)`` + ``RandomHorizontalFlip()``
  (GradML's and Metrix's recipe; NRA crops 224 from an image resized to 256);
- eval: ``Resize(int(image_size * 256 / 224))`` + ``CenterCrop(image_size)``
  (256 -> 224 at the default size).

``image_size`` comes from ``dataset.image_size`` (default 224). LoOp's code resizes
straight to 227 x 227 at test time (docs/datasets.md, "Transforms"); this project uses
the centre crop above for every method (one recipe, "A Metric Learning Reality Check").
"""

from __future__ import annotations

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224


def resize_size(image_size: int) -> int:
    """The short side before the centre crop: 256 for 224."""
    return int(image_size * 256 / 224)


def train_transform(image_size: int = DEFAULT_IMAGE_SIZE) -> T.Compose:
    return T.Compose(
        [
            T.RandomResizedCrop(image_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(image_size: int = DEFAULT_IMAGE_SIZE) -> T.Compose:
    return T.Compose(
        [
            T.Resize(resize_size(image_size)),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
