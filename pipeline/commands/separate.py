"""``metasep separate``: audio files in, stems out as ``OUT/<track>/<stem>.<ext>``.

The layout is Demucs' and Spleeter's. Files are separated one after another in this process, with
one model load for all of them: a single file does not pay for starting a cluster. A file that
cannot be read or separated gets one error line and the others are still processed; the exit code
is 1 when any file failed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from model import STEMS, CheckpointError, load_checkpoint
from pipeline.audio import AudioError
from pipeline.commands import UsageError
from pipeline.commands import catalog as catalog_run
from pipeline.commands.options import (
    add_catalog_arguments,
    add_separation_arguments,
    argument_type,
)
from pipeline.separator import SeparatedFile, Separator
from pipeline.settings import Settings, settings_from_args
from pipeline.stems import MAX_GAIN, parse_remix, parse_stems
from pipeline.weights import resolve_weights

KARAOKE = "karaoke"
REMIX = "remix"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "separate",
        help="separate audio files into drums, bass, other and vocals",
        description="Separate audio files (WAV, FLAC, MP3, OGG, AIFF, M4A, .stem.mp4...) into "
        "stems, written as OUT/<track>/<stem>.<ext>.",
    )
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="audio files; or SRC [DST] where SRC is a folder, prefix, glob or list of URIs "
        "(a catalog: run as the Prefect + Ray flow, see README)",
    )
    parser.add_argument(
        "-o", "--out", type=Path, default=Path("separated"), help="output folder (./separated)"
    )
    add_separation_arguments(parser)
    parser.add_argument(
        "--stems",
        type=argument_type(parse_stems),
        default=STEMS,
        help=f"comma-separated stems to write (default: {','.join(STEMS)})",
    )
    parser.add_argument(
        "--two-stems",
        choices=STEMS,
        metavar="STEM",
        help="write STEM and no_STEM (the other three summed) only",
    )
    parser.add_argument(
        "--karaoke", action="store_true", help=f"also write {KARAOKE}: drums + bass + other"
    )
    parser.add_argument(
        "--remix",
        type=argument_type(parse_remix),
        metavar="STEM=GAIN,...",
        help=f"also write {REMIX}: the stems re-balanced, e.g. vocals=1.2,drums=0.3 "
        f"(gains 0-{MAX_GAIN:g}; unnamed stems keep gain 1)",
    )
    parser.add_argument(
        "--start",
        type=_seconds,
        default=0.0,
        metavar="S",
        help="separate an excerpt starting S seconds in (the network still hears the context "
        "around it; the stems cover exactly the excerpt)",
    )
    parser.add_argument(
        "--duration",
        type=_seconds,
        metavar="D",
        help="length of the excerpt in seconds (default: to the end)",
    )
    add_catalog_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if catalog_run.wants_catalog(args.files, settings.options()):
        return catalog_run.run_separate_command(args, settings)
    args.files = [Path(name) for name in args.files]
    outputs = requested_outputs(args.stems, args.two_stems, args.karaoke, args.remix)
    separator = build_separator(settings)
    per_call = settings.separation().tracks_on(separator.device)
    started = time.perf_counter()
    failures: list[str] = []
    audio_seconds = 0.0
    folders: dict[Path, Path] = {}
    for path in args.files:
        destination = args.out / track_name(path)
        if destination in folders:
            failures.append(str(path))
            _error(
                f"{path}: same output folder {destination} as {folders[destination]}; rename one"
            )
            continue
        folders[destination] = path
    jobs = [(path, destination) for destination, path in folders.items()]
    show_files = len(args.files) > 1
    with tqdm(total=len(args.files), unit="file", disable=not show_files, desc="files") as bar:
        bar.update(len(args.files) - len(jobs))
        for first in range(0, len(jobs), per_call):
            group = jobs[first : first + per_call]
            results = separator.separate_files(
                group,
                outputs,
                settings.stem_format,
                progress=True,
                start=args.start,
                duration=args.duration,
            )
            for (path, _), result in zip(group, results, strict=True):
                if isinstance(result, SeparatedFile):
                    audio_seconds += result.frames / result.rate
                else:
                    failures.append(str(path))
                    _error(_message(path, result))
            bar.update(len(group))
    done = len(args.files) - len(failures)
    elapsed = time.perf_counter() - started
    print(
        f"separated {done} of {len(args.files)} file(s), {audio_seconds:.1f} s of audio in "
        f"{elapsed:.1f} s ({audio_seconds / elapsed:.2f} s of audio per second), into "
        f"{args.out}/<track>/ ({', '.join(outputs)} as .{settings.stem_format}; model "
        f"{separator.model_id}, {separator.device}, {separator.precision})"
    )
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def requested_outputs(
    stems: Sequence[str],
    two_stems: str | None,
    karaoke: bool,
    remix: dict[str, float] | None,
) -> dict[str, tuple[float, ...]]:
    """Output name -> weights of (drums, bass, other, vocals)."""
    if two_stems is not None and tuple(stems) != STEMS:
        raise UsageError("--two-stems and --stems cannot be combined")
    outputs: dict[str, tuple[float, ...]] = {}
    if two_stems is not None:
        outputs[two_stems] = _weights({two_stems: 1.0}, default=0.0)
        outputs[f"no_{two_stems}"] = _weights({two_stems: 0.0}, default=1.0)
    else:
        outputs.update({stem: _weights({stem: 1.0}, default=0.0) for stem in stems})
    if karaoke:
        outputs[KARAOKE] = _weights({"vocals": 0.0}, default=1.0)
    if remix is not None:
        outputs[REMIX] = _weights(remix, default=1.0)
    return outputs


def build_separator(settings: Settings) -> Separator:
    """The separator the settings ask for (their separation options, on their device), or a
    UsageError saying why there is none."""
    options = settings.separation()
    try:
        model = load_checkpoint(resolve_weights(options.checkpoint, settings))
        return Separator.from_options(
            options, settings.device, model=model, spool_dir=settings.spool_dir
        )
    except (CheckpointError, ValueError, RuntimeError) as error:
        raise UsageError(str(error).splitlines()[0]) from None


def track_name(path: Path) -> str:
    """The output folder name of an input: its name without extension (``.stem.mp4`` whole)."""
    name = path.name
    lowered = name.lower()
    for suffix in (".stem.mp4", ".stem.m4a"):
        if lowered.endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = Path(name).stem
    return name if name.strip(". ") else f"track{name}"


def _weights(gains: dict[str, float], default: float) -> tuple[float, ...]:
    return tuple(float(gains.get(stem, default)) for stem in STEMS)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be a finite number >= 0")
    return value


def _message(path: Path, error: Exception) -> str:
    """What went wrong with one file, naming it once (the engine's messages name their file)."""
    text = str(error) or type(error).__name__
    return text if isinstance(error, (AudioError, FloatingPointError)) else f"{path}: {text}"


def _error(message: str) -> None:
    tqdm.write(f"metasep separate: error: {message}", file=sys.stderr)
