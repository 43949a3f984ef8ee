"""metasep serve end to end: the real server, driven in headless Chromium like a person would.

Uploads a FluidSynth-rendered song through the page, waits for the stems, turns the drums down to
25 % with the keyboard, switches karaoke on, downloads the remix and checks that the file is the
stems mixed with exactly those gains. Debian's chromium is driven by Playwright through
``executable_path`` (no browser download).
"""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from model import STEMS
from pipeline.audio import read_audio

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
METASEP = Path(sys.executable).with_name("metasep")

pytestmark = [
    pytest.mark.slow,  # a metasep serve process and a headless browser
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (make system-deps installs chromium)"
    ),
]


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> Path:
    """A 6-second synth song (seed 8: drums, bass, other and vocals all play in it)."""
    out = tmp_path_factory.mktemp("synth")
    command = [str(METASEP), "synth", str(out), "--tracks", "1", "--seconds", "6", "--seed", "8"]
    subprocess.run([*command, "--workers", "1"], check=True, capture_output=True)
    (folder,) = (out / "train").iterdir()
    return folder / "mixture.wav"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``metasep serve`` on 127.0.0.1 and a free port; yields its URL and job folder."""
    workdir = tmp_path_factory.mktemp("serve")
    process = subprocess.Popen(
        [str(METASEP), "serve", "--port", "0", "--device", "cpu", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in process.stdout], daemon=True
    ).start()
    try:
        first = lines.get(timeout=120)
    except queue.Empty:
        process.kill()
        raise AssertionError("metasep serve printed nothing in 120 s") from None
    match = re.search(r"http://127\.0\.0\.1:\d+/", first)
    assert match, first
    yield match.group(0), workdir
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    assert not any(workdir.iterdir()), "job folders left after the server stopped"


def test_remix_downloaded_from_the_page_follows_the_sliders(server, song, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, _ = server
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            expect(page.locator("#limits")).to_contain_text("up to 200 MB")
            page.set_input_files("#file", str(song))
            expect(page.locator("#job")).to_be_visible()
            page.wait_for_selector("body[data-state=ready]", timeout=120_000)
            expect(page.locator(".stem")).to_have_count(4)
            job_id = page.evaluate("location.hash").removeprefix("#job=")

            drums = page.locator('[data-stem="drums"]')
            drums.locator("input.gain").focus()
            for _ in range(15):  # 1.00 -> 0.25 in steps of 0.05, as a keyboard user would
                page.keyboard.press("ArrowLeft")
            expect(drums.locator(".gain-value")).to_have_text("25%")
            page.click("#karaoke")
            expect(page.locator("#karaoke")).to_have_attribute("aria-pressed", "true")
            expect(page.locator('[data-stem="vocals"]')).to_have_class(re.compile("silent"))
            page.click("#play")
            expect(page.locator("#play")).to_have_class(re.compile("playing"))
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            if os.environ.get("METASEP_SCREENSHOT"):
                page.screenshot(path=os.environ["METASEP_SCREENSHOT"], full_page=True)

            with page.expect_download() as download_info:
                page.click("#download-remix")
            download = download_info.value
            assert download.suggested_filename == "mixture - remix.wav"
            remix_path = tmp_path / "remix.wav"
            download.save_as(remix_path)
        finally:
            browser.close()
    assert not errors, errors

    stems = {}
    for stem in STEMS:
        with urllib.request.urlopen(f"{url}api/jobs/{job_id}/stems/{stem}") as response:
            stems[stem] = read_audio(io.BytesIO(response.read()))[0]
    remix, rate = read_audio(remix_path)
    mixture, mixture_rate = read_audio(song)
    assert rate == mixture_rate and remix.shape == mixture.shape
    gains = {"drums": 0.25, "bass": 1.0, "other": 1.0, "vocals": 0.0}
    expected = sum(gains[stem] * stems[stem] for stem in STEMS)
    np.testing.assert_allclose(remix, expected, atol=1e-5)
    unchanged = sum(stems.values())
    changed = np.sqrt(np.mean((unchanged - remix) ** 2)) / np.sqrt(np.mean(unchanged**2))
    assert changed > 0.05, f"the remix is within {changed:.1%} of the unchanged mix"
