// metasep serve: upload a song, follow its separation, then play and remix the four stems.
//
// Playback is Web Audio: one AudioBufferSource per stem, each through its own GainNode into a
// master gain, all started at the same context time so that they stay sample-aligned. The
// remix download asks the server to render the same gains, so the file is what you hear.
"use strict";

(() => {
  const $ = (selector, root = document) => root.querySelector(selector);
  const POLL_MS = 400;
  const PEAKS = 800; // waveform columns computed per stem

  const ui = {
    body: document.body,
    file: $("#file"),
    drop: $("#drop"),
    limits: $("#limits"),
    error: $("#error"),
    catalog: $("#catalog"),
    catalogSearch: $("#catalog-search"),
    catalogList: $("#catalog-list"),
    catalogMore: $("#catalog-more"),
    jobCard: $("#job"),
    jobName: $("#job-name"),
    jobStatus: $("#job-status"),
    progress: $("#job .progress"),
    progressFill: $("#progress-fill"),
    cancel: $("#cancel"),
    mixer: $("#mixer"),
    trackName: $("#track-name"),
    stems: $("#stems"),
    play: $("#play"),
    time: $("#time"),
    karaoke: $("#karaoke"),
    reset: $("#reset"),
    downloadRemix: $("#download-remix"),
    remixFormat: $("#remix-format"),
    model: $("#model"),
    device: $("#device"),
    rowTemplate: $("#stem-row"),
  };

  let config = { stems: ["drums", "bass", "other", "vocals"], max_upload_bytes: Infinity };
  let current = null; // the job whose stems are loaded or loading
  let upload = null; // the XMLHttpRequest of an upload in flight
  let pollTimer = null;

  const player = {
    ctx: null,
    master: null,
    tracks: new Map(), // stem -> {buffer, gain, row, slider, muted, solo, peaks, canvas, shown}
    duration: 0,
    playing: false,
    offset: 0, // seconds into the song where playback is (paused) or started from
    startedAt: 0, // context time at which offset 0 would have played
    sources: [],
    karaoke: false,
  };

  // ------------------------------------------------------------------------------------------
  // Page state and messages

  function setState(state) {
    ui.body.dataset.state = state;
  }

  function showError(message) {
    ui.error.textContent = message;
    ui.error.hidden = false;
  }

  function clearError() {
    ui.error.hidden = true;
    ui.error.textContent = "";
  }

  function setProgress(fraction, text) {
    const percent = Math.max(0, Math.min(100, fraction * 100));
    ui.progressFill.style.width = `${percent}%`;
    ui.progress.setAttribute("aria-valuenow", percent.toFixed(0));
    if (text !== undefined) ui.jobStatus.textContent = text;
  }

  function formatTime(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
  }

  function formatBytes(bytes) {
    return bytes >= 2 ** 20 ? `${+(bytes / 2 ** 20).toFixed(1)} MB` : `${Math.ceil(bytes / 1024)} kB`;
  }

  async function api(path, options = {}) {
    const response = await fetch(path, options);
    const body = response.status === 204 ? {} : await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
    return body;
  }

  // ------------------------------------------------------------------------------------------
  // 1. Choosing a song: upload or catalog

  function startUpload(file) {
    clearError();
    if (file.size > config.max_upload_bytes) {
      showError(`${file.name}: ${formatBytes(file.size)} is larger than this server's upload limit of ${formatBytes(config.max_upload_bytes)}.`);
      return;
    }
    closeMixer();
    setState("uploading");
    ui.jobCard.hidden = false;
    ui.jobName.textContent = file.name;
    setProgress(0, "Uploading…");
    const request = new XMLHttpRequest();
    upload = request;
    request.open("POST", "/api/jobs");
    request.setRequestHeader("X-Filename", encodeURIComponent(file.name));
    request.setRequestHeader("Content-Type", "application/octet-stream");
    request.upload.onprogress = (event) => {
      if (event.lengthComputable) {
        const fraction = event.loaded / event.total;
        setProgress(fraction, `Uploading… ${Math.round(fraction * 100)}% of ${formatBytes(event.total)}`);
      }
    };
    request.onload = () => {
      upload = null;
      let body = {};
      try { body = JSON.parse(request.responseText); } catch (error) { /* not JSON */ }
      if (request.status === 202) {
        follow(body);
      } else {
        backToStart();
        showError(body.error || `Upload refused: ${request.status} ${request.statusText}`);
      }
    };
    request.onerror = () => {
      upload = null;
      backToStart();
      showError("The upload failed: the connection was lost (is the server still running?).");
    };
    request.send(file);
  }

  function backToStart() {
    stopPolling();
    ui.jobCard.hidden = true;
    setState("idle");
    ui.file.value = "";
  }

  let catalogQuery = null;
  async function searchCatalog() {
    const query = ui.catalogSearch.value.trim();
    if (query === catalogQuery) return;
    catalogQuery = query;
    try {
      const result = await api(`/api/catalog?q=${encodeURIComponent(query)}`);
      if (query !== catalogQuery) return;
      ui.catalogList.replaceChildren(...result.tracks.map(catalogItem));
      const hidden = result.total - result.tracks.length;
      ui.catalogMore.textContent = result.total === 0 ? "No separated track matches." :
        hidden > 0 ? `${hidden} more: refine the search.` : "";
    } catch (error) {
      showError(`Catalog: ${error.message}`);
    }
  }

  function catalogItem(track) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    const name = document.createElement("span");
    name.textContent = track.name;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = formatTime(track.duration_s);
    button.append(name, meta);
    button.addEventListener("click", () => openCatalogTrack(track));
    item.append(button);
    return item;
  }

  async function openCatalogTrack(track) {
    clearError();
    closeMixer();
    try {
      const job = await api("/api/catalog/open", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ key: track.key }),
      });
      ui.jobCard.hidden = false;
      ui.jobName.textContent = track.name;
      follow(job);
    } catch (error) {
      showError(error.message);
    }
  }

  // ------------------------------------------------------------------------------------------
  // 2. Following a job

  function follow(job) {
    current = job;
    history.replaceState(null, "", `#job=${job.id}`);
    ui.jobCard.hidden = false;
    ui.jobName.textContent = job.name;
    showJob(job);
    if (job.state === "done") {
      loadStems(job);
    } else if (job.state !== "error") {
      pollTimer = setTimeout(poll, POLL_MS);
    }
  }

  async function poll() {
    pollTimer = null;
    const id = current && current.id;
    if (!id) return;
    let job;
    try {
      job = await api(`/api/jobs/${id}`);
    } catch (error) {
      backToStart();
      history.replaceState(null, "", location.pathname);
      showError(error.message);
      return;
    }
    if (!current || current.id !== id) return; // cancelled or replaced meanwhile
    current = job;
    showJob(job);
    if (job.state === "done") loadStems(job);
    else if (job.state !== "error") pollTimer = setTimeout(poll, POLL_MS);
  }

  function stopPolling() {
    if (pollTimer !== null) clearTimeout(pollTimer);
    pollTimer = null;
  }

  function showJob(job) {
    if (job.state === "queued") {
      setState("queued");
      const ahead = job.queue_position + 1;
      setProgress(0, `Waiting for the separator: ${ahead} song${ahead > 1 ? "s" : ""} ahead of yours.`);
    } else if (job.state === "running") {
      setState("separating");
      const text = {
        analysing: "Analysing the audio…",
        separating: `Separating: ${Math.round(job.progress * 100)}% (${job.windows_done} of ${job.windows_total} windows)`,
        writing: "Writing the stems…",
      }[job.phase];
      setProgress(Math.max(0.02, estimatedProgress(job) * 0.95), text);
    } else if (job.state === "done") {
      setProgress(0.96, "Loading the stems into your browser…");
    } else if (job.state === "error") {
      backToStart();
      showError(job.error === "cancelled" ? "The separation was cancelled." : job.error);
    }
  }

  // The server counts windows as the network finishes each batch of them; between two counts
  // the bar moves on at the pace measured so far, and never reaches the end before the server.
  let pace = null;
  function estimatedProgress(job) {
    const now = performance.now();
    if (!pace || pace.id !== job.id || job.windows_done < pace.done) {
      pace = { id: job.id, start: now, done: job.windows_done, at: now };
    }
    if (job.windows_done !== pace.done) {
      pace.done = job.windows_done;
      pace.at = now;
    }
    const total = job.windows_total;
    if (!total || !pace.done || pace.done >= total) return job.progress;
    const perWindow = (pace.at - pace.start) / pace.done;
    const ahead = Math.min((now - pace.at) / perWindow, (total - pace.done) * 0.9);
    return (pace.done + ahead) / total;
  }

  async function cancel() {
    if (upload) upload.abort();
    upload = null;
    stopPolling();
    const job = current;
    current = null;
    backToStart();
    history.replaceState(null, "", location.pathname);
    if (job) await api(`/api/jobs/${job.id}`, { method: "DELETE" }).catch(() => {});
  }

  // ------------------------------------------------------------------------------------------
  // 3. Loading the stems and mixing them

  function audioContext() {
    if (!player.ctx) {
      player.ctx = new AudioContext();
      player.master = player.ctx.createGain();
      player.master.connect(player.ctx.destination);
    }
    return player.ctx;
  }

  async function loadStems(job) {
    setState("loading");
    const ctx = audioContext();
    let decoded = 0;
    try {
      const buffers = await Promise.all(config.stems.map(async (stem) => {
        const response = await fetch(job.stems[stem]);
        if (!response.ok) throw new Error(`${stem}: ${response.status} ${response.statusText}`);
        const buffer = await ctx.decodeAudioData(await response.arrayBuffer());
        decoded += 1;
        setProgress(0.96 + 0.04 * (decoded / config.stems.length), `Decoding the stems: ${decoded} of ${config.stems.length}`);
        return buffer;
      }));
      if (!current || current.id !== job.id) return;
      buildMixer(job, buffers);
    } catch (error) {
      backToStart();
      showError(`Could not load the stems: ${error.message}`);
    }
  }

  function buildMixer(job, buffers) {
    stopSources();
    player.tracks.clear();
    ui.stems.replaceChildren();
    player.duration = Math.max(...buffers.map((buffer) => buffer.duration));
    player.offset = 0;
    player.playing = false;
    const peaks = buffers.map(computePeaks);
    // One scale for all stems, so that their sizes compare; square-rooted, so that quiet
    // parts stay visible (closer to how loud they sound than a linear scale).
    const loudest = Math.max(1e-6, ...peaks.map((p) => Math.max(...p)));
    config.stems.forEach((stem, index) => {
      const row = ui.rowTemplate.content.firstElementChild.cloneNode(true);
      row.dataset.stem = stem;
      $(".stem-name", row).textContent = stem;
      const slider = $(".gain", row);
      slider.setAttribute("aria-label", `${stem} volume`);
      const download = $(".stem-download", row);
      download.href = job.stems[stem];
      download.setAttribute("aria-label", `Download ${stem}`);
      const gain = player.ctx.createGain();
      gain.connect(player.master);
      const track = {
        stem, buffer: buffers[index], gain, row, slider, muted: false, solo: false,
        peaks: peaks[index].map((value) => Math.sqrt(value / loudest)), canvas: $(".wave", row), shown: 1,
      };
      player.tracks.set(stem, track);
      slider.addEventListener("input", updateGains);
      $(".mute", row).addEventListener("click", () => { track.muted = !track.muted; updateGains(); });
      $(".solo", row).addEventListener("click", () => { track.solo = !track.solo; updateGains(); });
      track.canvas.addEventListener("click", (event) => {
        const box = track.canvas.getBoundingClientRect();
        seek(((event.clientX - box.left) / box.width) * player.duration);
      });
      ui.stems.append(row);
    });
    ui.trackName.textContent = job.name;
    ui.jobCard.hidden = true;
    ui.mixer.hidden = false;
    resizeCanvases();
    updateGains();
    setState("ready");
  }

  function computePeaks(buffer) {
    const peaks = new Float32Array(PEAKS);
    const size = Math.max(1, Math.ceil(buffer.length / PEAKS));
    for (let channel = 0; channel < buffer.numberOfChannels; channel += 1) {
      const data = buffer.getChannelData(channel);
      for (let column = 0; column < PEAKS; column += 1) {
        let peak = peaks[column];
        const end = Math.min(data.length, (column + 1) * size);
        for (let i = column * size; i < end; i += 1) {
          const value = Math.abs(data[i]);
          if (value > peak) peak = value;
        }
        peaks[column] = peak;
      }
    }
    return Array.from(peaks);
  }

  function effectiveGain(track) {
    const soloing = [...player.tracks.values()].some((t) => t.solo);
    if (track.muted || (soloing && !track.solo)) return 0;
    if (player.karaoke && track.stem === "vocals") return 0;
    return Number(track.slider.value);
  }

  function updateGains() {
    const now = player.ctx ? player.ctx.currentTime : 0;
    for (const track of player.tracks.values()) {
      const value = Number(track.slider.value);
      const gain = effectiveGain(track);
      track.gain.gain.setTargetAtTime(gain, now, 0.015);
      track.row.classList.toggle("silent", gain === 0);
      $(".gain-value", track.row).textContent = `${Math.round(value * 100)}%`;
      track.slider.style.setProperty("--fill", `${(value / Number(track.slider.max)) * 100}%`);
      $(".mute", track.row).setAttribute("aria-pressed", String(track.muted));
      $(".solo", track.row).setAttribute("aria-pressed", String(track.solo));
    }
    ui.karaoke.setAttribute("aria-pressed", String(player.karaoke));
  }

  function resetMix() {
    player.karaoke = false;
    for (const track of player.tracks.values()) {
      track.slider.value = "1";
      track.muted = false;
      track.solo = false;
    }
    updateGains();
  }

  // ------------------------------------------------------------------------------------------
  // Transport

  function position() {
    if (!player.playing) return player.offset;
    return Math.min(player.duration, Math.max(0, player.ctx.currentTime - player.startedAt));
  }

  function play() {
    const ctx = audioContext();
    ctx.resume();
    if (player.offset >= player.duration) player.offset = 0;
    const when = ctx.currentTime + 0.05;
    player.sources = [...player.tracks.values()].map((track) => {
      const source = ctx.createBufferSource();
      source.buffer = track.buffer;
      source.connect(track.gain);
      source.start(when, player.offset);
      return source;
    });
    player.startedAt = when - player.offset;
    player.playing = true;
    ui.play.classList.add("playing");
    ui.play.setAttribute("aria-label", "Pause");
  }

  function pause() {
    player.offset = position();
    stopSources();
  }

  function stopSources() {
    for (const source of player.sources) {
      try { source.stop(); } catch (error) { /* never started */ }
      source.disconnect();
    }
    player.sources = [];
    player.playing = false;
    ui.play.classList.remove("playing");
    ui.play.setAttribute("aria-label", "Play");
  }

  function seek(seconds) {
    const wasPlaying = player.playing;
    if (wasPlaying) stopSources();
    player.offset = Math.max(0, Math.min(player.duration, seconds));
    if (wasPlaying) play();
  }

  function togglePlay() {
    if (player.playing) pause();
    else play();
  }

  function closeMixer() {
    stopSources();
    ui.mixer.hidden = true;
  }

  // ------------------------------------------------------------------------------------------
  // Drawing: each stem's waveform, scaled by its gain, played part bright, and the playhead

  function resizeCanvases() {
    const ratio = window.devicePixelRatio || 1;
    for (const track of player.tracks.values()) {
      track.canvas.width = Math.round(track.canvas.clientWidth * ratio);
      track.canvas.height = Math.round(track.canvas.clientHeight * ratio);
    }
  }

  function draw() {
    if (!ui.mixer.hidden && player.tracks.size) {
      const now = position();
      if (player.playing && now >= player.duration) {
        stopSources();
        player.offset = 0;
      }
      ui.time.textContent = `${formatTime(now)} / ${formatTime(player.duration)}`;
      const played = player.duration ? now / player.duration : 0;
      for (const track of player.tracks.values()) {
        track.shown += (Math.min(effectiveGain(track), 2) - track.shown) * 0.25;
        drawWave(track, played);
      }
    }
    requestAnimationFrame(draw);
  }

  function drawWave(track, played) {
    const canvas = track.canvas;
    const context = canvas.getContext("2d");
    const { width, height } = canvas;
    if (!width || !height) return;
    const color = getComputedStyle(track.row).getPropertyValue("--color").trim() || "#7c6cff";
    context.clearRect(0, 0, width, height);
    const middle = height / 2;
    const step = width / track.peaks.length;
    const bar = Math.max(1, step * 0.7);
    const scale = Math.max(0.02, track.shown);
    for (let i = 0; i < track.peaks.length; i += 1) {
      const x = i * step;
      const half = Math.max(0.75, Math.min(middle - 1, track.peaks[i] * Math.sqrt(scale) * (middle - 2)));
      context.fillStyle = color;
      context.globalAlpha = x / width < played ? 0.95 : 0.32;
      context.fillRect(x, middle - half, bar, half * 2);
    }
    context.globalAlpha = 1;
    context.fillStyle = "#ffffff";
    context.fillRect(Math.min(width - 2, played * width), 0, 2, height);
  }

  // ------------------------------------------------------------------------------------------
  // Downloads

  function downloadRemix() {
    const parameters = new URLSearchParams();
    for (const track of player.tracks.values()) {
      parameters.set(track.stem, effectiveGain(track).toFixed(4));
    }
    parameters.set("format", ui.remixFormat.value);
    const link = document.createElement("a");
    link.href = `${current.remix}?${parameters}`;
    link.download = "";
    document.body.append(link);
    link.click();
    link.remove();
  }

  // ------------------------------------------------------------------------------------------
  // Wiring

  async function init() {
    try {
      config = await api("/api/config");
    } catch (error) {
      showError(`The server did not answer: ${error.message}`);
      return;
    }
    ui.limits.textContent = `WAV, FLAC, MP3, OGG, M4A… up to ${formatBytes(config.max_upload_bytes)} and ${Math.round(config.max_seconds / 60)} minutes`;
    ui.model.textContent = `model ${config.model_id.slice(0, 12)}`;
    ui.device.textContent = `separating on ${config.device}`;
    if (config.catalog) {
      ui.catalog.hidden = false;
      searchCatalog();
    }
    const match = location.hash.match(/^#job=([A-Za-z0-9_-]+)$/);
    if (match) {
      current = { id: match[1] };
      ui.jobCard.hidden = false;
      poll();
    }
  }

  ui.file.addEventListener("change", () => {
    if (ui.file.files.length) startUpload(ui.file.files[0]);
  });
  ui.drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    ui.drop.classList.add("over");
  });
  ui.drop.addEventListener("dragleave", () => ui.drop.classList.remove("over"));
  ui.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    ui.drop.classList.remove("over");
    if (event.dataTransfer.files.length) startUpload(event.dataTransfer.files[0]);
  });
  let searchTimer = null;
  ui.catalogSearch.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(searchCatalog, 200);
  });
  ui.cancel.addEventListener("click", cancel);
  ui.play.addEventListener("click", togglePlay);
  ui.karaoke.addEventListener("click", () => { player.karaoke = !player.karaoke; updateGains(); });
  ui.reset.addEventListener("click", resetMix);
  ui.downloadRemix.addEventListener("click", downloadRemix);
  document.addEventListener("keydown", (event) => {
    const typing = event.target.closest("input, select, textarea, button");
    if (event.code === "Space" && !typing && ui.body.dataset.state === "ready") {
      event.preventDefault();
      togglePlay();
    }
  });
  window.addEventListener("resize", resizeCanvases);
  requestAnimationFrame(draw);
  init();
})();
