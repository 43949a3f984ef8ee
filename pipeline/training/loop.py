"""The training loop, single-process or one Ray Train worker of a DDP group.

A run directory holds ``metrics.jsonl`` (one JSON object per line), ``last.safetensors`` and
``best.safetensors`` (own format, with steps and metrics in the metadata) and ``state.pt`` (the
optimiser, step and random-generator states that ``--resume`` needs; read with
``weights_only=True``). Rank 0 validates and writes; the other ranks only train.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model import STEMS, MultiTasNet, load_checkpoint, save_checkpoint
from model.loss import stem_si_snr
from pipeline.separator import Separator
from pipeline.training.config import RunConfig
from pipeline.training.data import CropSampler, StageTrack
from pipeline.training.optim import Ranger, sgdr_learning_rate

log = logging.getLogger(__name__)


@dataclass
class Job:
    """Everything a training process needs, picklable for Ray workers."""

    run_dir: Path
    run_config: RunConfig
    train_tracks: list[StageTrack]
    valid_tracks: list[StageTrack]
    data: str
    resume: bool = False
    progress: bool = True
    extra_metadata: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Owns the model, optimiser and sampler of one process."""

    def __init__(self, job: Job, rank: int = 0, world: int = 1, device: str = "cpu") -> None:
        self.job, self.rank, self.world, self.device = job, rank, world, torch.device(device)
        self.config, model_config = job.run_config.training, job.run_config.model
        self.sampler = CropSampler(
            job.train_tracks,
            self.config,
            model_config.sampling_rate,
            model_config.W,
            seed=self.config.seed + 1000 * rank,
        )
        torch.manual_seed(self.config.seed)
        self.step, self.best = 0, -math.inf
        state = self._load_state() if job.resume else None
        if state is not None:
            self.model = load_checkpoint(job.run_dir / "last.safetensors").to(self.device)
        else:
            self.model = MultiTasNet(model_config).to(self.device)
            self._set_spectrogram_statistics()
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = Ranger(
            trainable, lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )
        if state is not None:
            self._restore(state)
        self.network: torch.nn.Module = self.model  # replaced by the DDP wrapper when distributed

    def _set_spectrogram_statistics(self) -> None:
        """Normalisation of the mel branch from training crops, before step 1 (as the paper)."""
        rng_state = self.sampler.state()
        mixes, _, _ = self.sampler.batch(self.config.stats_examples)
        self.sampler.set_state(rng_state)  # statistics do not consume the training stream
        with torch.no_grad():
            for stage, mix in zip(self.model.stages, mixes, strict=True):
                spectrogram = stage.encoder.spectrogram
                spectrogram.set_statistics(spectrogram.magnitude_db(mix.to(self.device)))

    def learning_rate(self) -> float:
        c = self.config
        return sgdr_learning_rate(self.step, c.learning_rate, c.sgdr_period, c.sgdr_decay)

    def train_step(self) -> tuple[float, np.ndarray]:
        """One optimiser step; returns the loss and the stats row."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        mixes, separated, masks = (
            [t.to(self.device, non_blocking=True) for t in part]
            for part in self.sampler.batch(self.config.batch_size)
        )
        loss, stats = self.network(mixes, separated, masks)
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_gradient)
        self.optimizer.step()
        self.step += 1
        return float(loss.detach()), stats.detach().cpu().numpy()[0]

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """SI-SNR per stem of whole held-out stereo tracks separated as users get them, by the
        engine (:class:`pipeline.separator.Separator` with its default windows); objective = the
        mean over stems, which picks ``best.safetensors``.

        The release's chunked inference, which validation used before, agrees with a single pass
        at only 12 dB on the shipped model, the engine's windows at 28.8 dB: a checkpoint chosen
        on it was chosen on a path that no user runs.
        """
        tracks = self.job.valid_tracks[: self.config.valid_tracks]
        if not tracks:
            return {}
        self.model.eval()
        try:
            separator = Separator(self.model, device=self.device)
            rate = self.model.config.stage_rates()[-1]
            scores = np.mean([self._track_scores(separator, t, rate) for t in tracks], axis=0)
        finally:
            self.model.train()
        return {
            "si_snr": dict(zip(STEMS, map(float, scores), strict=True)),
            "objective": float(scores.mean()),
            "tracks": len(tracks),
            "inference": "engine",
        }

    def _track_scores(self, separator: Separator, track: StageTrack, rate: int) -> np.ndarray:
        """SI-SNR (4,) of one track: its stereo mix at the last stage's rate through the
        engine, each channel an example; a stem silent in a channel is left out of its mean."""
        stems = np.asarray(track.stages[-1], dtype=np.float32)  # (4, channels, samples)
        estimates = separator.separate(stems.sum(0), rate)
        estimate = torch.from_numpy(np.stack([estimates[s] for s in STEMS], 1))[:, :, None]
        target = torch.from_numpy(stems.transpose(1, 0, 2).copy())[:, :, None]
        mask = (target.abs().amax(-1) >= self.config.silence_peak).float()
        return stem_si_snr(estimate, target, mask).numpy()

    def save(self, metrics: dict[str, Any], sampler_states: list[dict[str, Any]]) -> None:
        """Write last (and best, when the objective improved) weights, then the resume state."""
        run_dir = self.job.run_dir
        metadata = {
            "steps": self.step,
            "data": self.job.data,
            "metrics": metrics,
            "training": self.job.run_config.to_dict()["training"],
            **self.job.extra_metadata,
        }
        objective = metrics.get("objective", -math.inf)
        if objective > self.best:
            self.best = objective
            save_checkpoint(self.model, run_dir / "best.tmp.safetensors", metadata)
            (run_dir / "best.tmp.safetensors").replace(run_dir / "best.safetensors")
        save_checkpoint(self.model, run_dir / "last.tmp.safetensors", metadata)
        state = {
            "step": self.step,
            "best": self.best,
            "optimizer": self.optimizer.state_dict(),
            "samplers": sampler_states,
            "torch_rng": torch.get_rng_state(),
        }
        torch.save(state, run_dir / "state.tmp.pt")
        (run_dir / "last.tmp.safetensors").replace(run_dir / "last.safetensors")
        (run_dir / "state.tmp.pt").replace(run_dir / "state.pt")

    def _load_state(self) -> dict[str, Any] | None:
        path = self.job.run_dir / "state.pt"
        if not path.exists():
            log.warning("--resume: no %s, starting from scratch", path)
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def _restore(self, state: dict[str, Any]) -> None:
        self.step, self.best = int(state["step"]), float(state["best"])
        self.optimizer.load_state_dict(state["optimizer"])
        samplers = state["samplers"]
        self.sampler.set_state(samplers[self.rank % len(samplers)])
        torch.set_rng_state(state["torch_rng"])


def run(trainer: Trainer, gather_sampler_states=None) -> dict[str, Any]:
    """Train until ``steps``; log, validate and checkpoint on rank 0. Returns the final metrics."""
    config, job = trainer.config, trainer.job
    lead = trainer.rank == 0
    metrics_file = (job.run_dir / "metrics.jsonl").open("a") if lead else None
    bar = tqdm(
        total=config.steps,
        initial=trainer.step,
        desc="training",
        unit="step",
        disable=not (lead and job.progress),
    )
    window, started, last_validation = [], time.perf_counter(), {}
    if lead and trainer.step == 0:  # the untrained model's score: the baseline of the run
        _write(metrics_file, {"step": 0, "valid": trainer.validate()})
    try:
        while trainer.step < config.steps:
            loss, stats = trainer.train_step()
            window.append((loss, stats))
            stems = stats[-7:-3]
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss:.2f}",
                lr=f"{trainer.learning_rate():.2e}",
                **{s[:3]: f"{v:.1f}" for s, v in zip(STEMS, stems, strict=True)},
            )
            done = trainer.step >= config.steps
            if lead and (trainer.step % config.log_every == 0 or done):
                _write(metrics_file, _train_line(trainer, window, started))
                window = []
            if trainer.step % config.validate_every == 0 or done:
                states = (
                    gather_sampler_states(trainer.sampler.state())
                    if gather_sampler_states
                    else [trainer.sampler.state()]
                )
                if lead:
                    last_validation = trainer.validate()
                    _write(metrics_file, {"step": trainer.step, "valid": last_validation})
                    trainer.save(last_validation, states)
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    return {
        "step": trainer.step,
        "valid": last_validation,
        "best_objective": trainer.best,
        "seconds": time.perf_counter() - started,
    }


def _train_line(
    trainer: Trainer, window: list[tuple[float, np.ndarray]], started: float
) -> dict[str, Any]:
    losses = [loss for loss, _ in window]
    stats = np.mean([s for _, s in window], axis=0)
    stages = (len(stats) - 3) // 4
    return {
        "step": trainer.step,
        "seconds": round(time.perf_counter() - started, 2),
        "lr": trainer.learning_rate(),
        "loss": float(np.mean(losses)),
        "si_snr": {
            f"stage{i}": dict(zip(STEMS, map(float, stats[4 * i : 4 * i + 4]), strict=True))
            for i in range(stages)
        },
        "reconstruction_si_snr": float(stats[-3]),
        "dissimilarity": float(stats[-2]),
        "similarity": float(stats[-1]),
    }


def _write(file, record: dict[str, Any]) -> None:
    file.write(json.dumps(record) + "\n")
    file.flush()


def summarize(run_dir: Path) -> dict[str, Any]:
    """Final step, last validation and best objective of a run, read from its metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if r.get("valid") and r["step"] > 0]
    return {
        "step": max((r["step"] for r in records), default=0),
        "valid": validations[-1]["valid"] if validations else {},
        "best_objective": max((r["valid"]["objective"] for r in validations), default=-math.inf),
    }
