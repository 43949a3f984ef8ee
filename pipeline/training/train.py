"""Entry points: prepare a training job from a catalog, then train locally or with Ray Train."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.settings import load_settings
from pipeline.training.config import RunConfig
from pipeline.training.data import default_cache_dir, find_tracks, prepare_tracks
from pipeline.training.loop import Job, Trainer, run, summarize

log = logging.getLogger(__name__)


def prepare_job(
    data: str,
    run_dir: Path,
    run_config: RunConfig,
    *,
    resume: bool = False,
    storage_options: dict[str, Any] | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> Job:
    """Check the run folder, write its config, find and cache the train and validation tracks.

    Validation uses the catalog's ``valid`` split when it has one, else the last tenth of the
    training tracks (at least one) is held out.
    """
    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if resume and config_file.exists():
        run_config = _resumed_config(config_file, run_config)
    elif (run_dir / "state.pt").exists():
        raise ValueError(
            f"{run_dir} already holds a training run: pass --resume or choose another folder"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(run_config.to_dict(), indent=2))
    train_sources = find_tracks(data, "train", storage_options)
    try:
        valid_sources = find_tracks(data, "valid", storage_options)
        if valid_sources == train_sources:
            raise ValueError
    except ValueError:
        held_out = max(1, len(train_sources) // 10) if len(train_sources) > 1 else 0
        valid_sources = train_sources[len(train_sources) - held_out :]
        train_sources = train_sources[: len(train_sources) - held_out] or train_sources
    rates = run_config.model.stage_rates()
    cache = cache_dir or default_cache_dir()
    train = prepare_tracks(train_sources, rates, cache, storage_options, progress)
    valid = prepare_tracks(valid_sources, rates, cache, storage_options, progress)
    log.info("training on %d tracks, validating on %d", len(train), len(valid))
    metadata = {"train_tracks": len(train), "valid_tracks": len(valid)}
    return Job(run_dir, run_config, train, valid, data, resume, progress, metadata)


def _resumed_config(config_file: Path, requested: RunConfig) -> RunConfig:
    """A resumed run keeps its architecture and options; only the step budget may grow."""
    saved = RunConfig.from_dict(json.loads(config_file.read_text()))
    if requested.training.steps == saved.training.steps:
        return saved
    training = {**saved.to_dict()["training"], "steps": requested.training.steps}
    return RunConfig.from_dict({"model": saved.model.to_dict(), "training": training})


def train_local(job: Job, device: str | None = None) -> dict[str, Any]:
    """Train in this process (cuda when available)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return run(Trainer(job, device=device))


def train_ray(
    job: Job, workers: int, gpus_per_worker: float = 0.0, ray_address: str | None = None
) -> dict[str, Any]:
    """Data-parallel training with Ray Train's TorchTrainer: DDP over gloo (CPU) or NCCL (GPU).

    Connects to ``ray_address`` (else ``METASEP_RAY_ADDRESS`` / ``RAY_ADDRESS``) when given, else starts a local Ray. The run
    folder must be reachable by every worker (local disk for one machine, shared storage else).
    """
    import ray
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # "local": a Ray of its own, not the cluster `ray start` last recorded on this machine
    address = load_settings(ray_address=ray_address).ray_address or "local"
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    use_gpu = gpus_per_worker > 0
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": 1, **({"GPU": gpus_per_worker} if use_gpu else {})},
        ),
        run_config=RayRunConfig(storage_path=str(job.run_dir.resolve() / "ray"), name="train"),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return summarize(job.run_dir)


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """One DDP rank: train, then record a digest of its weights for the consistency check."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    job: Job = loop_config["job"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    trainer = Trainer(job, rank, world, str(ray.train.torch.get_device()))
    trainer.network = ray.train.torch.prepare_model(
        trainer.model, parallel_strategy_kwargs={"find_unused_parameters": True}
    )

    def gather(state: dict[str, Any]) -> list[dict[str, Any]]:
        states: list[Any] = [None] * world
        dist.all_gather_object(states, state)
        return states

    run(trainer, gather)
    digest = weights_digest(trainer.model)
    workers_dir = job.run_dir / "workers"
    workers_dir.mkdir(exist_ok=True)
    (workers_dir / f"rank-{rank}.json").write_text(
        json.dumps({"rank": rank, "step": trainer.step, "weights_sha256": digest})
    )
    ray.train.report({"step": trainer.step, "weights_sha256": digest})


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in state-dict order."""
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
