"""The settings object: METASEP_* variables, Ray's RAY_ADDRESS, CLI flags and flow parameters
in one order of precedence; storage options as JSON, merged; credentials never shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import build_parser, main
from pipeline.settings import (
    Settings,
    SettingsError,
    credential_keys,
    load_settings,
    redact,
    settings_from_args,
    use_settings,
)

SECRET = "wJalrXUtnFEMI-not-a-real-secret"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No METASEP_* or RAY_ADDRESS of the machine leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("METASEP_") or name == "RAY_ADDRESS":
            monkeypatch.delenv(name)


def test_defaults_without_environment():
    settings = load_settings()
    assert settings.checkpoint == "default" and settings.workers is None
    assert (settings.gpus_per_worker, settings.cpus_per_worker) == (0.0, 1.0)
    assert settings.ray_address is None and settings.options() is None
    assert (settings.precision, settings.stem_format) == ("auto", "flac")
    assert settings.cache_dir == Path.home() / ".cache" / "metasep"


def test_environment_variables_are_read_and_typed(monkeypatch, tmp_path):
    monkeypatch.setenv("METASEP_WORKERS", "4")
    monkeypatch.setenv("METASEP_GPUS_PER_WORKER", "0.5")
    monkeypatch.setenv("METASEP_CHECKPOINT", "/models/best.safetensors")
    monkeypatch.setenv("METASEP_DEVICE", "cuda:1")
    monkeypatch.setenv("METASEP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("METASEP_STORAGE_OPTIONS", '{"endpoint_url": "http://minio:9000"}')
    settings = load_settings()
    assert settings.workers == 4 and settings.gpus_per_worker == 0.5
    assert settings.checkpoint == "/models/best.safetensors" and settings.device == "cuda:1"
    assert settings.cache_dir == tmp_path
    assert settings.options() == {"endpoint_url": "http://minio:9000"}


def test_ray_address_precedence(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert load_settings().ray_address == "10.0.0.1:6379"  # Ray's own variable, as fallback
    monkeypatch.setenv("METASEP_RAY_ADDRESS", "ray://head:10001")
    assert load_settings().ray_address == "ray://head:10001"  # ours wins over Ray's
    assert load_settings(ray_address="auto").ray_address == "auto"  # a flag/parameter wins
    monkeypatch.delenv("METASEP_RAY_ADDRESS")
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert load_settings().ray_address is None  # set but empty: no cluster


def test_overrides_beat_environment_and_none_means_unset(monkeypatch):
    monkeypatch.setenv("METASEP_WORKERS", "4")
    monkeypatch.setenv("METASEP_PRECISION", "bfloat16")
    settings = load_settings(workers=2, precision=None, checkpoint=None)
    assert settings.workers == 2 and settings.precision == "bfloat16"
    assert settings.checkpoint == "default"
    with pytest.raises(TypeError, match="unknown settings: wokers"):
        load_settings(wokers=3)


def test_storage_options_merge_key_by_key(monkeypatch):
    env = {"endpoint_url": "http://minio:9000", "key": "AKIA1", "secret": SECRET}
    monkeypatch.setenv("METASEP_STORAGE_OPTIONS", json.dumps(env))
    merged = load_settings(storage_options={"endpoint_url": "http://other:9000", "anon": False})
    assert merged.options() == {**env, "endpoint_url": "http://other:9000", "anon": False}


def test_cli_flags_over_environment_over_defaults(monkeypatch):
    parser = build_parser()
    monkeypatch.setenv("METASEP_WORKERS", "4")
    monkeypatch.setenv("METASEP_GPUS_PER_WORKER", "1")
    monkeypatch.setenv("METASEP_STORAGE_OPTIONS", '{"endpoint_url": "http://minio:9000"}')
    monkeypatch.setenv("METASEP_STEM_FORMAT", "wav")
    args = parser.parse_args(["separate", "s3://a/in", "s3://a/out", "--workers", "2"])
    settings = settings_from_args(args)
    assert settings.workers == 2 and settings.gpus_per_worker == 1.0
    assert settings.stem_format == "wav"
    args = parser.parse_args(
        [
            "separate",
            "s3://a/in",
            "s3://a/out",
            "--format",
            "flac",
            "--storage-options",
            '{"anon": true}',
        ]
    )
    settings = settings_from_args(args)
    assert settings.workers == 4 and settings.stem_format == "flac"
    assert settings.options() == {"endpoint_url": "http://minio:9000", "anon": True}
    help_text = parser._subparsers._group_actions[0].choices["separate"].format_help()
    assert "METASEP_WORKERS" in help_text and "METASEP_GPUS_PER_WORKER" in help_text


def test_use_settings_hands_settings_to_code_that_loads_them(monkeypatch):
    monkeypatch.setenv("METASEP_WORKERS", "4")
    given = load_settings(workers=7, storage_options={"secret": SECRET})
    with use_settings(given):
        inside = load_settings(checkpoint="x.safetensors")
        assert inside.workers == 7 and inside.options() == {"secret": SECRET}
        assert inside.checkpoint == "x.safetensors"
    assert load_settings().workers == 4 and load_settings().options() is None


def test_credentials_are_never_shown(monkeypatch):
    options = {
        "endpoint_url": "http://minio:9000",
        "key": "AKIA1",
        "secret": SECRET,
        "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": SECRET},
    }
    monkeypatch.setenv("METASEP_STORAGE_OPTIONS", json.dumps(options))
    monkeypatch.setenv("METASEP_RAY_ADDRESS", f"ray://admin:{SECRET}@head:10001")
    settings = load_settings()
    for text in (
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        json.dumps(settings.describe()),
    ):
        assert SECRET not in text and "AKIA1" not in text
    shown = settings.describe()
    assert shown["storage_options"]["endpoint_url"] == "http://minio:9000"
    assert shown["storage_options"]["secret"] == "***"
    assert shown["storage_options"]["client_kwargs"] == {
        "region_name": "eu-west-1",
        "aws_session_token": "***",
    }
    assert shown["ray_address"] == "ray://***@head:10001"
    assert settings.options() == options  # the real values, for fsspec
    assert credential_keys(options) == ["key", "secret", "client_kwargs.aws_session_token"]
    assert redact({"endpoint_url": f"https://u:{SECRET}@s3.example"}) == {
        "endpoint_url": "https://***@s3.example"
    }


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("METASEP_STORAGE_OPTIONS", '{"secret": "' + SECRET + '"', "not JSON"),
        ("METASEP_STORAGE_OPTIONS", f'["{SECRET}"]', "must be a JSON object"),
        ("METASEP_WORKERS", "0", "greater than or equal to 1"),
        ("METASEP_GPUS_PER_WORKER", "lots", "valid number"),
    ],
)
def test_invalid_settings_name_the_variable_not_the_value(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert variable in str(error.value) and message in str(error.value)
    assert SECRET not in str(error.value)


def test_cli_reports_a_bad_setting_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("METASEP_STORAGE_OPTIONS", '{"secret": "' + SECRET + '"')
    assert main(["separate", "s3://bucket/in", "s3://bucket/out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metasep separate: error: storage_options (--storage-options or ")
    assert "METASEP_STORAGE_OPTIONS" in err and SECRET not in err and len(err.splitlines()) == 1
    monkeypatch.delenv("METASEP_STORAGE_OPTIONS")
    assert main(["separate", "s3://bucket/in", "s3://bucket/out", "--workers", "0"]) == 2
    assert "workers (--workers or METASEP_WORKERS)" in capsys.readouterr().err


@pytest.mark.parametrize("catalog", [False, True])
def test_a_bad_precision_is_refused_in_one_line_before_anything_starts(
    monkeypatch, capsys, tmp_path, catalog
):
    """From the flag or from METASEP_PRECISION, for files and for a catalog: exit code 2, one
    line naming both, and nothing made (no output folder, no flow, no model loaded)."""
    (tmp_path / "music").mkdir()
    (tmp_path / "music" / "song.wav").write_bytes(b"never read")
    out = tmp_path / "out"
    command = (
        ["separate", str(tmp_path / "music"), str(out)]
        if catalog
        else [
            "separate",
            str(tmp_path / "music" / "song.wav"),
            "-o",
            str(out),
        ]
    )
    for flag, environment in ((["--precision", "fp8"], None), ([], "half")):
        if environment:
            monkeypatch.setenv("METASEP_PRECISION", environment)
        assert main([*command, *flag]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        assert err.startswith("metasep separate: error: precision (--precision or ")
        assert "METASEP_PRECISION" in err and "'auto', 'float32', 'bfloat16'" in err
        assert not out.exists()


def test_separation_options_are_built_once_from_flags_over_environment(monkeypatch):
    monkeypatch.setenv("METASEP_SEGMENT", "12.5")
    monkeypatch.setenv("METASEP_PRECISION", "bfloat16")
    args = build_parser().parse_args(["separate", "a.wav", "--context", "1", "--format", "wav"])
    options = settings_from_args(args).separation()
    assert (options.segment, options.context, options.precision) == (12.5, 1.0, "bfloat16")
    assert options.stem_format == "wav" and options.batch_size is None
    with pytest.raises(Exception, match="frozen"):
        options.segment = 3.0  # one value, carried whole


def test_training_cache_follows_the_setting(monkeypatch, tmp_path):
    from pipeline.training.data import default_cache_dir

    monkeypatch.setenv("METASEP_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "train"


def test_settings_object_is_frozen():
    settings = Settings()
    with pytest.raises(Exception, match="frozen"):
        settings.workers = 3
