"""``bespoke-ext pretrain``: retrain an embedded model (or an FCD classifier) from its packaged data.

    bespoke-ext pretrain moons2d --iterations 6000          one model preset
    bespoke-ext pretrain all                                every preset, in turn
    bespoke-ext pretrain classifier-mnist                   the digit classifier behind the FCD
"""

from __future__ import annotations

import argparse

import torch

from ..metrics.classifier import CLASSIFIERS
from ..models.pretrain import PRESETS

__all__ = ["add_pretrain_arguments", "run_pretrain"]

_CLASSIFIER = "classifier-"


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``bespoke-ext pretrain NAME --out DIR --iterations N --seed S``."""
    names = sorted(PRESETS) + ["all"] + [_CLASSIFIER + c for c in sorted(CLASSIFIERS)]
    parser.add_argument("name", choices=names,
                        help="model preset to train ('all': every preset, in turn), or classifier-<data> for the "
                             "digit classifier of the Frechet classifier distance")
    parser.add_argument("--out", default=None, help="output folder (default: the package's weights folder)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="training iterations (default: the preset's; epochs for a classifier)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--weights-dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is fastest on a machine busy with other work)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_pretrain(args: argparse.Namespace) -> int:
    """Run pretraining from parsed arguments; prints one summary line per model. Returns 0."""
    from ..metrics.classifier import train_classifier
    from ..models.pretrain import pretrain

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.name.startswith(_CLASSIFIER):
        name = args.name[len(_CLASSIFIER):]
        card = train_classifier(name, args.out, seed=args.seed, epochs=args.iterations, progress=not args.no_progress)
        print(f"classifier {name}: held-out accuracy {card['heldout_accuracy']:.4f} in "
              f"{card['training']['wall_clock_seconds']} s, {card['weights']['bytes']} bytes")
        return 0
    for name in sorted(PRESETS) if args.name == "all" else [args.name]:
        card = pretrain(name, args.out, iterations=args.iterations, seed=args.seed, progress=not args.no_progress,
                        batch_size=args.batch_size, weights_dtype=args.weights_dtype)
        tr = card["training"]
        print(f"{name}: {tr['iterations']} iterations in {tr['wall_clock_seconds']:.0f} s, final loss {tr['final_loss']:.4f}, "
              f"held-out loss {tr['heldout_loss']:.4f}, weights sha256 {card['weights']['sha256'][:12]}...")
    return 0
