"""Catalog listing, output paths, manifests and planning: local files and a real S3 API (moto)."""

from __future__ import annotations

import os
import posixpath
from datetime import UTC, datetime
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from model import STEMS
from pipeline.catalog.housekeeping import read_done, survey_stems
from pipeline.catalog.listing import is_catalog_source, list_catalog, listing_table
from pipeline.catalog.plan import StemIndex, plan_tracks
from pipeline.storage.errors import CatalogError
from pipeline.storage.location import is_transient, open_location, retry_storage, write_bytes
from pipeline.storage.manifest import ManifestWriter, latest_done, read_manifests
from pipeline.storage.paths import sanitized_key, stem_paths

HOSTILE_KEYS = [
    "../escape.wav",
    "x/../../up2.wav",
    "/absolute/root.wav",
    "//double//slash.wav",
    "./dot/./song.wav",
    "back\\..\\slash.wav",
    "ctrl\x01char\x7f.wav",
    "..",
    "a/../..",
    ".hidden-dir/x.wav",
    "ü" * 150 + ".wav",
]


def listed(*args, **kwargs) -> list[SimpleNamespace]:
    """The listing's rows, each with its columns as attributes."""
    return [SimpleNamespace(**row) for row in list_catalog(*args, **kwargs).to_pylist()]


def write_tone(path, seconds=0.5, rate=22050, channels=2, frequency=220.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.2 * np.sin(2 * np.pi * frequency * t)
    sf.write(path, np.stack([tone] * channels, 1), rate)


def test_local_listing_is_recursive_audio_only_with_size_and_version(tmp_path):
    write_tone(tmp_path / "a.wav")
    write_tone(tmp_path / "albums" / "b c" / "ünï ✓.flac")
    (tmp_path / "albums" / "cover.jpg").write_bytes(b"\xff\xd8")
    (tmp_path / "notes.txt").write_text("not audio")
    (tmp_path / "._a.wav").write_bytes(b"resource fork")
    tracks = listed(str(tmp_path))
    assert [t.track_id for t in tracks] == ["a.wav", "albums/b c/ünï ✓.flac"]
    first = tracks[0]
    assert first.source_uri == str(tmp_path / "a.wav")
    assert first.source_size == (tmp_path / "a.wav").stat().st_size
    assert first.output_key == "a"
    assert tracks[1].output_key == "albums/b c/ünï ✓"
    before = first.source_version
    write_tone(tmp_path / "a.wav", frequency=330.0)
    os.utime(tmp_path / "a.wav", (1, 1))
    assert listed(str(tmp_path))[0].source_version != before
    assert is_catalog_source(str(tmp_path)) and not is_catalog_source(str(tmp_path / "a.wav"))


def test_glob_and_uri_manifest_sources(tmp_path):
    write_tone(tmp_path / "lib" / "one.wav")
    write_tone(tmp_path / "lib" / "sub" / "two.flac")
    write_tone(tmp_path / "lib" / "sub" / "three.wav")
    globbed = listed(str(tmp_path / "lib" / "**" / "*.wav"))
    assert [t.track_id for t in globbed] == ["one.wav", "sub/three.wav"]
    listing = tmp_path / "lib" / "tracks.txt"
    listing.write_text(f"# wanted\nsub/two.flac\n{tmp_path / 'lib' / 'one.wav'}\nmissing.wav\n")
    by_id = {t.track_id: t for t in listed(str(listing))}
    assert sorted(by_id) == ["missing.wav", "one.wav", "sub/two.flac"]
    assert by_id["sub/two.flac"].source_size > 0 and by_id["missing.wav"].source_size == 0
    with pytest.raises(CatalogError, match="no such folder"):
        list_catalog(str(tmp_path / "nowhere"))
    with pytest.raises(CatalogError, match="no audio files"):
        list_catalog(str(tmp_path / "lib" / "*.mp3"))
    write_tone(tmp_path / "live [2020]" / "song [encore].wav")
    assert not is_catalog_source(str(tmp_path / "live [2020]" / "song [encore].wav"))
    assert is_catalog_source(str(tmp_path / "live [2020]")) and is_catalog_source(str(listing))
    (bracketed,) = listed(str(tmp_path / "live [2020]"))
    assert bracketed.track_id == "song [encore].wav"


@pytest.mark.parametrize("track_id", HOSTILE_KEYS)
def test_hostile_keys_never_leave_the_destination(tmp_path, track_id):
    destination = str(tmp_path / "out")
    key = sanitized_key(track_id)
    for path in stem_paths(destination, key, "flac").values():
        resolved = os.path.realpath(path)
        assert resolved.startswith(os.path.realpath(destination) + "/stems/")
        relative = path[len(destination) + 1 :].split("/")
        assert not {"", ".", ".."} & set(relative)
        assert all(not part.startswith(".") for part in relative)
        assert all(len(part.encode()) < 255 for part in relative)
        assert not any(ord(ch) < 32 or ch in "\x7f\\" for ch in path)
    assert stem_paths(destination, "ok/key", "wav")["vocals"].endswith("stems/ok/key/vocals.wav")
    with pytest.raises(ValueError, match=r"outside|unsafe"):
        stem_paths(destination, "../x", "wav")


def test_output_keys_are_unique_and_keep_clean_names():
    ids = ["song.wav", "song.flac", "dir/x.mp3", "dir/../x.mp3", *HOSTILE_KEYS]
    table = listing_table((track_id, f"/src/{track_id}", 1, "v1") for track_id in ids)
    keys = dict(zip(table["track_id"].to_pylist(), table["output_key"].to_pylist(), strict=True))
    assert keys["dir/x.mp3"] == "dir/x"
    assert keys["song.wav"] != keys["song.flac"]
    assert keys["song.wav"].startswith("song-")
    assert len(set(keys.values())) == len(keys)


def test_hostile_s3_keys_are_listed_verbatim_and_mapped_safely(s3_bucket, tmp_path):
    fs, bucket, options = s3_bucket
    for key in ["a.wav", "../escape.wav", "x/../../up.wav", "./dot.wav", "sp ace ünï.wav"]:
        fs.pipe(f"{bucket}/music/{key}", b"RIFF")
    fs.pipe(f"{bucket}/music/readme.md", b"text")
    tracks = listed(f"s3://{bucket}/music", options)
    assert {t.track_id for t in tracks} == {
        "a.wav",
        "../escape.wav",
        "x/../../up.wav",
        "./dot.wav",
        "sp ace ünï.wav",
    }
    assert all(t.source_version.startswith("etag:") and t.source_size == 4 for t in tracks)
    assert all(t.source_uri.startswith(f"s3://{bucket}/music/") for t in tracks)
    for track in tracks:
        for path in stem_paths(f"{bucket}/out", track.output_key, "flac").values():
            assert posixpath.normpath(path).startswith(f"{bucket}/out/stems/")
            assert ".." not in path.split("/")


def test_s3_versions_change_with_content(s3_bucket):
    fs, bucket, options = s3_bucket
    fs.pipe(f"{bucket}/lib/a.wav", b"one")
    before = listed(f"s3://{bucket}/lib", options)[0].source_version
    fs.pipe(f"{bucket}/lib/a.wav", b"two")
    assert listed(f"s3://{bucket}/lib", options)[0].source_version != before


def manifest_row(track_id, status, version, model="m1", options="o1", finished=1):
    return {
        "run_id": "r",
        "track_id": track_id,
        "source_uri": f"/src/{track_id}",
        "source_size": 10,
        "source_version": version,
        "status": status,
        "error": None if status == "ok" else "broken",
        "model_id": model,
        "options_hash": options,
        "started_at": datetime.fromtimestamp(finished, UTC),
        "finished_at": datetime.fromtimestamp(finished, UTC),
        **{f"{stem}_uri": None for stem in STEMS},
    }


def test_plan_skips_only_tracks_whose_last_ok_row_still_holds(tmp_path):
    fs, root = open_location(str(tmp_path))
    writer = ManifestWriter(fs, root, "run-a", flush_rows=2)
    for row in [
        manifest_row("same.wav", "ok", "v1"),
        manifest_row("changed.wav", "ok", "v1"),
        manifest_row("failed.wav", "error", "v1"),
        manifest_row("remodel.wav", "ok", "v1", model="m0"),
        manifest_row("later.wav", "ok", "v0", finished=1),
    ]:
        writer.add(row)
    writer.close()
    late = ManifestWriter(fs, root, "run-b")
    late.add(manifest_row("later.wav", "ok", "v1", finished=5))
    late.close()
    (tmp_path / "manifest" / "run=run-c").mkdir()
    (tmp_path / "manifest" / "run=run-c" / "part-00000.parquet").write_bytes(b"torn")
    table = read_manifests(fs, root)
    assert table.num_rows == 6 and len(writer.parts) == 3
    versions = {"changed.wav": "v2"}
    names = ["same", "changed", "failed", "remodel", "later", "new"]
    tracks = listing_table(
        (f"{n}.wav", f"/src/{n}.wav", 10, versions.get(f"{n}.wav", "v1")) for n in names
    )
    plan = plan_tracks(tracks, latest_done(table), "m1", "o1")
    assert plan.skipped == 2 and plan.listed == 6 and plan.lost == 0
    assert plan.todo["track_id"].to_pylist() == [
        "changed.wav",
        "failed.wav",
        "new.wav",
        "remodel.wav",
    ]


def test_atomic_local_writes_leave_no_temporary_files(tmp_path):
    fs, root = open_location(str(tmp_path))
    write_bytes(fs, f"{root}/deep/er/file.bin", b"x" * 10)
    write_bytes(fs, f"{root}/deep/er/file.bin", b"y" * 3)
    assert (tmp_path / "deep" / "er" / "file.bin").read_bytes() == b"yyy"
    assert os.listdir(tmp_path / "deep" / "er") == ["file.bin"]


def test_transient_storage_errors_are_retried_and_permanent_ones_are_not():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "done"

    assert retry_storage(flaky, "flaky call", first_delay=0.01) == "done" and len(calls) == 3
    assert not is_transient(FileNotFoundError("x")) and is_transient(TimeoutError())
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://bucket/nope")

    with pytest.raises(FileNotFoundError):
        retry_storage(missing, "missing", first_delay=0.01)
    assert len(calls) == 1


def test_destination_inside_the_source_is_not_listed(tmp_path):
    write_tone(tmp_path / "lib" / "song.wav")
    write_tone(tmp_path / "lib" / "out" / "stems" / "song" / "drums.wav")
    write_tone(tmp_path / "lib" / "outtakes" / "take.wav")
    tracks = listed(str(tmp_path / "lib"), exclude=str(tmp_path / "lib" / "out"))
    assert [t.track_id for t in tracks] == ["outtakes/take.wav", "song.wav"]


def test_memory_filesystem_listing_and_manifests():
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/lib/a/b.wav", b"x" * 5)
    memory.pipe("/lib/c.txt", b"no")
    (track,) = listed("memory://lib")
    assert (track.track_id, track.source_size, track.source_uri) == (
        "a/b.wav",
        5,
        "memory:///lib/a/b.wav",
    )
    fs, root = open_location("memory://dst")
    writer = ManifestWriter(fs, root, "r1")
    writer.add(manifest_row("a/b.wav", "ok", track.source_version))
    writer.close()
    plan = plan_tracks(
        list_catalog("memory://lib"), latest_done(read_manifests(fs, root)), "m1", "o1"
    )
    assert plan.skipped == 1 and plan.planned == 0


def test_done_tracks_whose_stems_are_gone_are_planned_again_and_named(tmp_path):
    """One listing of DST/stems per run: a done track missing any stem is separated again and
    counted as lost; partial files of killed writers are removed on the way."""
    fs, root = open_location(str(tmp_path / "out"))
    names = ["kept", "lost", "half"]
    tracks = listing_table((f"{n}.wav", f"/src/{n}.wav", 10, "v1") for n in names)
    writer = ManifestWriter(fs, root, "r1")
    for name in names:
        writer.add(manifest_row(f"{name}.wav", "ok", "v1"))
    writer.close()
    for name in ("kept", "half"):
        for stem in STEMS if name == "kept" else STEMS[:2]:
            write_bytes(fs, f"{root}/stems/{name}/{stem}.flac", b"fLaC")
    partial = tmp_path / "out" / "stems" / "half" / ".other.flac.0a1b2c3d.partial"
    partial.write_bytes(b"killed mid-write")
    stems, removed = survey_stems(fs, root)
    assert removed == 1 and not partial.exists() and len(stems) == 6
    done, quarantined = read_done(fs, root)
    plan = plan_tracks(tracks, done, "m1", "o1", stems, "flac")
    assert plan.todo["track_id"].to_pylist() == ["half.wav", "lost.wav"]
    assert (plan.skipped, plan.lost, plan.lost_examples) == (1, 2, ["half.wav", "lost.wav"])
    assert quarantined == []
    # a stem of another format is not the one the row promises
    assert plan_tracks(tracks, done, "m1", "o1", stems, "wav").lost == 3
    assert StemIndex([]).holds(["kept/drums.flac"]).tolist() == [False]


def test_an_unreadable_manifest_part_is_moved_aside_and_its_tracks_planned_again(tmp_path):
    """A truncated part (a writer killed mid-copy on a disk without atomic renames, a bad
    sync) would stop every reader of the hive dataset: it goes to manifest/_quarantine/, which
    pyarrow's dataset discovery skips, and its tracks have no done row any more."""
    import pyarrow.dataset as ds

    fs, root = open_location(str(tmp_path))
    writer = ManifestWriter(fs, root, "good")
    writer.add(manifest_row("a.wav", "ok", "v1"))
    writer.close()
    broken = ManifestWriter(fs, root, "broken")
    broken.add(manifest_row("b.wav", "ok", "v1"))
    broken.close()
    part = tmp_path / "manifest" / "run=broken" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:40])  # truncated
    with pytest.raises(Exception):  # noqa: B017 (what readers saw before: any error at all)
        ds.dataset(str(tmp_path / "manifest"), partitioning="hive").to_table()
    done, quarantined = read_done(fs, root)
    assert done["track_id"].to_pylist() == ["a.wav"] and not part.exists()
    assert quarantined == [str(tmp_path / "manifest" / "_quarantine" / "run=broken" / part.name)]
    table = ds.dataset(str(tmp_path / "manifest"), partitioning="hive").to_table()
    assert table["track_id"].to_pylist() == ["a.wav"]
    tracks = listing_table((f"{n}.wav", f"/src/{n}.wav", 10, "v1") for n in ("a", "b"))
    assert plan_tracks(tracks, done, "m1", "o1").todo["track_id"].to_pylist() == ["b.wav"]
