"""``metasep train``: train Meta-TasNet on a MUSDB18-HQ-layout catalog, locally or with Ray Train."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from pipeline.commands import UsageError
from pipeline.commands.options import setting_help
from pipeline.settings import settings_from_args
from pipeline.training.config import load_run_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model on a MUSDB18-HQ-layout catalog",
        description="Train Meta-TasNet on DATA/<split>/<track>/{drums,bass,other,vocals}.wav "
        "(local path or fsspec URL, e.g. metasep synth output or MUSDB18-HQ). Validation uses "
        "DATA/valid when present, else a tenth of the training tracks.",
    )
    parser.add_argument("data", help="catalog root (path or URL)")
    parser.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, metrics)")
    parser.add_argument("--config", default="default", help="default | paper | FILE.json")
    parser.add_argument("--steps", type=int, help="total optimiser steps (overrides the config)")
    parser.add_argument("--batch-size", type=int, help="examples per step and worker")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    parser.add_argument(
        "--workers", type=int, default=1, help="Ray Train DDP workers (1: in-process)"
    )
    parser.add_argument("--gpus-per-worker", type=float, help=setting_help("gpus_per_worker"))
    parser.add_argument(
        "--device",
        help=setting_help("device", "device for in-process training (default: cuda if present)"),
    )
    parser.add_argument(
        "--ray-address",
        help=setting_help("ray_address", "existing Ray cluster (default: RAY_ADDRESS or local)"),
    )
    parser.add_argument("--cache-dir", type=Path, help=setting_help("cache_dir"))
    parser.add_argument("--storage-options", type=json.loads, help=setting_help("storage_options"))
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.training.train import prepare_job, train_local, train_ray

    settings = settings_from_args(args)
    try:
        run_config = load_run_config(args.config)
        overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v}
        if overrides:
            run_config = dataclasses.replace(
                run_config, training=dataclasses.replace(run_config.training, **overrides)
            )
        job = prepare_job(
            args.data,
            args.out,
            run_config,
            resume=args.resume,
            storage_options=settings.options(),
            cache_dir=settings.cache_dir / "train",
        )
    except (ValueError, OSError) as error:
        raise UsageError(str(error)) from None
    if args.workers > 1:
        result = train_ray(job, args.workers, settings.gpus_per_worker, settings.ray_address)
    else:
        result = train_local(job, settings.device)
    valid = result.get("valid") or {}
    print(
        f"trained to step {result.get('step')}; best validation SI-SNR "
        f"{result.get('best_objective', float('nan')):.2f} dB"
        + (f" (last: {valid.get('objective', float('nan')):.2f} dB)" if valid else "")
    )
    print(
        f"checkpoints: {args.out / 'best.safetensors'}, {args.out / 'last.safetensors'}; "
        f"metrics: {args.out / 'metrics.jsonl'}"
    )
    return 0
