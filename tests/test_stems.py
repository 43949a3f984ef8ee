"""One rule for stem lists and gains: the CLI's --stems/--targets/--remix, the serve API."""

from __future__ import annotations

import pytest

from model import STEMS
from pipeline.cli import main
from pipeline.stems import MAX_GAIN, parse_gains, parse_remix, parse_stems


def test_stem_lists_keep_order_and_refuse_unknown_or_empty():
    assert parse_stems(" vocals,drums ,") == ("vocals", "drums")
    for text in ("drums,piano", " , "):
        with pytest.raises(ValueError, match="choose from"):
            parse_stems(text)


def test_gains_are_factors_from_zero_to_the_maximum():
    assert parse_gains({"vocals": "0", "drums": str(MAX_GAIN), "format": "wav"}) == {
        **dict.fromkeys(STEMS, 1.0),
        "vocals": 0.0,
        "drums": MAX_GAIN,
    }
    assert parse_remix("vocals=1.5, bass=0") == {"vocals": 1.5, "bass": 0.0}
    for bad, reason in (("-0.5", "between 0 and"), ("inf", "between 0 and"), ("x", "number")):
        with pytest.raises(ValueError, match=reason):
            parse_gains({"bass": bad})
        with pytest.raises(ValueError, match=reason):
            parse_remix(f"bass={bad}")
    with pytest.raises(ValueError, match="between 0 and"):
        parse_remix(f"bass={MAX_GAIN * 1.01}")
    with pytest.raises(ValueError, match="STEM=GAIN"):
        parse_remix("bass")


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["separate", "song.wav", "--remix", "vocals=-1"], "between 0 and 4"),
        (["separate", "song.wav", "--stems", "drums,piano"], "unknown stem(s) piano"),
        (["evaluate", "refs", "est", "out", "--targets", "kazoo"], "unknown stem(s) kazoo"),
    ],
)
def test_the_cli_prints_the_rule_it_broke(argv, reason, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert reason in capsys.readouterr().err
