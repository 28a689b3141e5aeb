"""``bespoke-ext train-pipeline``: train a solver for a diffusers pipeline and save it as its scheduler.

    bespoke-ext train-pipeline mypkg.pipes:make_flux --embeddings prompts.safetensors --height 512 --width 512 \\
        --guidance 3.5 --nfe 8 --iterations 300 --batch-size 16 -o flux-bespoke-nfe8
    pipe.scheduler = BespokeScheduler.from_pretrained("flux-bespoke-nfe8")        # then, in Python
    pipe(..., num_inference_steps=pipe.scheduler.steps)

The pipeline is ``module:factory`` (or ``path/to/file.py:factory``): a diffusers pipeline, or a
zero-argument callable returning one (text encoders and VAE may be None: only the transformer runs). The
embeddings file (safetensors) holds the prompt encodings by the pipeline's own argument names, one row
per prompt with one leading dimension M for every name: ``prompt_embeds`` [M, seq, dim] and
``pooled_prompt_embeds`` [M, dim], plus ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds`` for
SD3 with guidance > 1 (CFG) or Flux with --true-cfg-scale > 1. Encode them once with ``pipe.encode_prompt``
and ``safetensors.torch.save_file``. Training is ``bespoke_ext.train(pipeline_velocity(pipe, height=H,
width=W, guidance_scale=G), solver, conditions=<the file's tensors>)``; DIR gets the scheduler
(``BespokeScheduler.from_solver(solver, **velocity.scheduler_settings).save_pretrained(DIR)``) and the solver file
``solver.safetensors`` (for ``bespoke-ext sample`` and the ComfyUI nodes).

Memory (README, Memory): --gradient-checkpointing (end-to-end losses: chosen by default with it),
--chunk-size, --dtype bfloat16 (the transformer in bf16, ground truth and solver states in float32).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import torch

from ..training.options import LOSSES, TrainOptions
from .conditioning import read_conditions
from .model_spec import check_device, import_target
from .paths import writable_dir

__all__ = ["add_train_pipeline_arguments", "run_train_pipeline", "load_pipeline", "load_embeddings",
           "PipelineTrainingError"]

_DEFAULTS = TrainOptions()
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SOLVER_FILE = "solver.safetensors"


class PipelineTrainingError(ValueError):
    """A pipeline, embeddings file or option that train-pipeline cannot use (the message says why)."""


def add_train_pipeline_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train-pipeline`` subcommand's arguments to ``parser``."""
    parser.add_argument("pipeline", help="module:factory or file.py:factory: a diffusers pipeline (Flux, SD3) or "
                                         "a zero-argument callable returning one")
    parser.add_argument("--embeddings", required=True, metavar="FILE",
                        help="safetensors of prompt encodings by pipeline name (prompt_embeds [M, seq, dim], "
                             "pooled_prompt_embeds [M, dim], ...), one row per prompt")
    parser.add_argument("--height", type=int, required=True, help="image height in pixels the solver is for")
    parser.add_argument("--width", type=int, required=True, help="image width in pixels the solver is for")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance_scale as the pipeline takes it (default: the pipeline's own)")
    parser.add_argument("--true-cfg-scale", type=float, default=1.0, help="Flux: true CFG with the negatives (default 1: off)")
    parser.add_argument("--solver", choices=("bespoke", "nonstationary"), default="bespoke")
    parser.add_argument("--nfe", type=int, default=8, help="transformer evaluations per sample (default 8)")
    parser.add_argument("--order", type=int, choices=(1, 2), default=None,
                        help="bespoke: 2 (midpoint base, steps = nfe/2; the default) or 1")
    parser.add_argument("--base", choices=("euler", "midpoint"), default=None, help="nonstationary: the start (default euler)")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for scheduler_config.json "
                                                                             "and solver.safetensors")
    g = parser.add_argument_group("training options (see bespoke_ext.training.TrainOptions)")
    g.add_argument("--lr", type=float, default=None,
                   help=f"default {_DEFAULTS.lr:g}; nonstationary (fitted by least squares first): 0.01 / NFE")
    g.add_argument("--loss", choices=LOSSES, default=None, help="default: bound (bespoke), log_mse (nonstationary), "
                                                                "end_to_end (bespoke with --gradient-checkpointing)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each evaluation's activations in backward (end-to-end losses)")
    g.add_argument("--chunk-size", type=int, default=_DEFAULTS.chunk_size, help="most samples per transformer call")
    g.add_argument("--dtype", choices=sorted(MODEL_DTYPES), default=None,
                   help="cast the transformer (states and ground truth stay float32)")
    g.add_argument("--device", default=None)
    g.add_argument("--gt-tol", type=float, default=_DEFAULTS.gt_rtol)
    g.add_argument("--cache-dir", default=None)
    g.add_argument("--cache-samples", type=int, default=_DEFAULTS.cache_samples)
    g.add_argument("--val-size", type=int, default=_DEFAULTS.val_size)
    g.add_argument("--val-every", type=int, default=_DEFAULTS.val_every)
    g.add_argument("--keep-last", action="store_true",
                   help="save the last iterate, not the best-validated solver (keep_best=False)")
    g.add_argument("--checkpoint", default=None)
    g.add_argument("--model-tag", default=None)
    g.add_argument("--no-progress", action="store_true")
    return parser


def load_pipeline(spec: str):
    """The pipeline ``spec`` names (a pipeline object, or a zero-argument factory called once)."""
    try:
        obj = import_target(spec, "pipeline")
    except ValueError as exc:
        raise PipelineTrainingError(str(exc)) from exc
    if not hasattr(obj, "transformer") and callable(obj):
        obj = obj()
    if getattr(obj, "transformer", None) is None:
        raise PipelineTrainingError(f"pipeline {spec!r} gave a {type(obj).__name__} without a transformer; "
                                    f"train-pipeline needs a diffusers flow pipeline (Flux, SD3)")
    return obj


def _names(velocity):
    """(required, accepted) condition names of a pipeline_velocity model."""
    params = list(inspect.signature(velocity.forward).parameters.values())[2:]  # after x, t
    required = {p.name for p in params if p.default is inspect.Parameter.empty}
    negatives = {p.name for p in params if p.name.startswith("negative_")}
    g = float(getattr(velocity, "guidance_scale", 1.0))
    cfg = getattr(velocity, "true_cfg_scale", None)
    if (g > 1 if cfg is None else float(cfg) > 1):  # SD3's CFG, Flux's true CFG: the negatives are read
        required |= negatives
    return required, {p.name for p in params}


def load_embeddings(path, velocity, dtype=None) -> dict:
    """The conditions pool for ``velocity`` from a safetensors file (module docstring), checked: every name the
    transformer needs is there, no other name, one leading dimension, last sizes the transformer's."""
    path = Path(path)
    try:   # a file, of named tensors sharing one leading dimension M: the conditions format
        tensors = read_conditions(path, "--embeddings")
    except ValueError as exc:
        raise PipelineTrainingError(str(exc)) from None
    required, accepted = _names(velocity)
    kind = type(velocity.transformer).__name__
    missing, unknown = sorted(required - set(tensors)), sorted(set(tensors) - accepted)
    if missing:
        raise PipelineTrainingError(f"--embeddings {path}: {kind} needs {missing} (the file holds {sorted(tensors)}); "
                                    f"save the pipeline's encode_prompt outputs by those names")
    if unknown:
        raise PipelineTrainingError(f"--embeddings {path}: {unknown} are not inputs of this pipeline's transformer "
                                    f"call; the names it takes are {sorted(accepted)}")
    config = velocity.transformer.config
    for name, t in tensors.items():
        pooled = "pooled" in name
        want_dim = 2 if pooled else 3
        size = getattr(config, "pooled_projection_dim" if pooled else "joint_attention_dim", None)
        if t.dim() != want_dim or (size is not None and t.shape[-1] != size):
            shape = "[M, dim]" if pooled else "[M, seq, dim]"
            raise PipelineTrainingError(f"--embeddings {path}: {name} has shape {tuple(t.shape)}; {kind} takes "
                                        f"{shape} with dim = {size}")
    return {name: t.to(dtype) if dtype is not None and t.is_floating_point() else t for name, t in tensors.items()}


def run_train_pipeline(args: argparse.Namespace) -> int:
    """Run the ``train-pipeline`` subcommand; returns the exit status."""
    try:
        return _run(args)
    except PipelineTrainingError as exc:
        print(f"bespoke-ext train-pipeline: error: {exc}", file=sys.stderr)
        return 2


def _solver(args):
    from ..solvers import BespokeSolver, NonStationarySolver

    if args.nfe < 1:
        raise PipelineTrainingError(f"--nfe must be >= 1, got {args.nfe}")
    if args.solver == "nonstationary":
        if args.order is not None:
            raise PipelineTrainingError(f"--order is for --solver bespoke; a non-stationary solver takes --base "
                                        f"(got --order {args.order})")
        return NonStationarySolver(args.nfe, args.base or "euler")
    if args.base is not None:
        raise PipelineTrainingError(f"--base is for --solver nonstationary; a BespokeSolver's base is its --order "
                                    f"(got --base {args.base})")
    order = 2 if args.order is None else args.order
    if args.nfe % order:
        raise PipelineTrainingError(f"--nfe {args.nfe} is not a multiple of --order {order} (a bespoke solver "
                                    f"makes order evaluations per step)")
    return BespokeSolver(args.nfe // order, order=order)


def _run(args: argparse.Namespace) -> int:
    from ..integrations.diffusers import BespokeScheduler
    from ..integrations.pipelines import pipeline_velocity
    from ..training import train

    pipe = load_pipeline(args.pipeline)
    try:
        velocity = pipeline_velocity(pipe, height=args.height, width=args.width, guidance_scale=args.guidance,
                                     true_cfg_scale=args.true_cfg_scale)
    except NotImplementedError as exc:
        raise PipelineTrainingError(f"pipeline {args.pipeline!r}: {exc}") from exc
    if args.dtype is not None:
        velocity.transformer.to(MODEL_DTYPES[args.dtype])
    if args.device is not None:
        velocity.to(check_device(args.device))
    conditions = load_embeddings(args.embeddings, velocity, dtype=velocity.transformer.dtype)
    solver = _solver(args)
    out = writable_dir(Path(args.output), "-o")   # before training, which a bad folder would otherwise waste
    ns = args.solver == "nonstationary"
    loss = args.loss or ("log_mse" if ns else "end_to_end" if args.gradient_checkpointing else "bound")
    if args.gradient_checkpointing and loss == "bound":
        raise PipelineTrainingError("--gradient-checkpointing recomputes a rollout through the solver: use an "
                                    "end-to-end loss (--loss end_to_end or log_mse), not bound")
    solver = train(velocity, solver, shape=velocity.latent_shape, iterations=args.iterations, batch_size=args.batch_size,
                   seed=args.seed, conditions=conditions, lr=args.lr, loss=loss,
                   gradient_checkpointing=args.gradient_checkpointing, chunk_size=args.chunk_size,
                   gt_rtol=args.gt_tol, gt_atol=args.gt_tol, cache_dir=args.cache_dir, cache_samples=args.cache_samples,
                   val_size=args.val_size, val_every=args.val_every, device=args.device, checkpoint=args.checkpoint,
                   model_tag=args.model_tag, keep_best=not args.keep_last, progress=not args.no_progress)
    meta = {"pipeline": args.pipeline, "height": args.height, "width": args.width, "guidance": velocity.guidance_scale}
    solver.save(out / SOLVER_FILE, metadata={k: str(v) for k, v in meta.items()})
    BespokeScheduler.from_solver(solver, **velocity.scheduler_settings).save_pretrained(out)
    h = solver.history
    if h.base_rmse:
        print(f"validation RMSE vs ground truth at NFE {solver.nfe}: start {h.base_rmse:.5g}, bespoke "
              f"{h.best_rmse:.5g} ({h.best_rmse / h.base_rmse:.3f}x; iteration {h.best_iteration})")
    print(f"wrote {out / 'scheduler_config.json'} and {out / SOLVER_FILE}: pipe.scheduler = "
          f"BespokeScheduler.from_pretrained({str(out)!r}); pipe(..., num_inference_steps={solver.steps})")
    return 0
