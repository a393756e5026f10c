// Presence call page: plain ES module, no build step (Chromium and Firefox).
//
// Flow: getUserMedia -> RTCPeerConnection -> tracks + "events" data channel -> offer ->
// wait for ICE gathering to complete (aiortc does not trickle) -> POST /api/offer -> answer.
// window.presence exposes the page state so browser tests can read it.

const $ = (id) => document.getElementById(id);

const MAX_EVENTS = 200; // kept in window.presence.events
const SHOWN_EVENTS = 40; // lines in the on-page log
const MAX_CAPTIONS = 200;
const GATHER_TIMEOUT_MS = 5000; // send what was gathered rather than hang forever

const params = new URLSearchParams(location.search);
const token = params.get("token") || "";

let analyser = null;
let analyserBuf = null;
let audioCtx = null;
let localStream = null;
let channel = null;
let firstEventT = null;
let generation = 0; // bumped by every teardown, so a join that was abandoned stops
let resourceToken = null; // from the offer's answer: only it can hang this call up
const latencyStats = new Map(); // name -> {last, sum, n}

const presence = {
  state: "idle", // idle | connecting | connected | listening | thinking | speaking | ended | error
  connection: "new", // RTCPeerConnection.connectionState
  captions: [], // {who, text, final}
  latencies: {}, // name -> last ms
  events: [], // raw data channel events and local lifecycle marks, newest last
  pc: null,
  config: null,
  callId: null,
  peerId: null,
  error: null, // {code, message} of the last failed join
  jobs: [], // background jobs of this call: {job_id, kind, status, title, summary}
  listeners: [], // functions called with every bot event (an embedding page or a benchmark)
  remoteLevel() {
    // RMS of what the page receives from the bot (0 when nothing is attached yet)
    if (!analyser) return 0;
    analyser.getFloatTimeDomainData(analyserBuf);
    let sum = 0;
    for (const v of analyserBuf) sum += v * v;
    return Math.sqrt(sum / analyserBuf.length);
  },
};
window.presence = presence;

// ------------------------------------------------------------------ UI helpers

class JoinError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

function showError(code, message) {
  presence.error = { code, message };
  $("error-code").textContent = code;
  $("error-message").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  presence.error = null;
  $("error").hidden = true;
}

const BOT_STATES = new Set(["listening", "thinking", "speaking"]);
const PAGE_EVENTS = new Set(["state", "caption", "latency", "participant_joined", "participant_left", "video_frame"]);

function setState(state) {
  presence.state = state;
  const badge = $("badge");
  badge.textContent = state;
  badge.className = `badge state-${state}`;
}

function setConnection(state) {
  presence.connection = state;
  const el = $("connection");
  el.textContent = state;
  el.dataset.state = state;
}

function setInCall(inCall) {
  $("join").disabled = inCall;
  $("hangup").disabled = !inCall;
  for (const id of ["mode", "room", "name", "language", "original"]) $(id).disabled = inCall;
}

function fmtT(t) {
  if (typeof t !== "number") return "";
  if (firstEventT === null) firstEventT = t;
  return `${(t - firstEventT).toFixed(2)}s`;
}

function logEvent(entry) {
  presence.events.push(entry);
  if (presence.events.length > MAX_EVENTS) presence.events.splice(0, presence.events.length - MAX_EVENTS);
  const li = document.createElement("li");
  const { type, name, t, call, ...rest } = entry;
  const detail = Object.keys(rest).length ? JSON.stringify(rest) : "";
  const time = document.createElement("span");
  time.className = "t";
  time.textContent = type === "local" ? "page" : fmtT(t);
  const label = document.createElement("span");
  label.className = `name ${type === "local" ? "local" : ""}`;
  label.textContent = name;
  const info = document.createElement("span");
  info.className = "detail";
  info.textContent = detail.length > 120 ? `${detail.slice(0, 117)}...` : detail;
  li.append(time, label, info);
  const log = $("event-log");
  log.append(li);
  while (log.children.length > SHOWN_EVENTS) log.firstElementChild.remove();
  log.scrollTop = log.scrollHeight;
}

function localMark(name, data = {}) {
  logEvent({ type: "local", name, t: performance.now() / 1000, ...data });
}

// ------------------------------------------------------------------ events from the bot

function renderCaptions() {
  const list = $("captions");
  list.replaceChildren(
    ...presence.captions.slice(-60).map((c) => {
      const li = document.createElement("li");
      li.className = `caption ${c.who === "bot" ? "bot" : "caller"} ${c.final ? "final" : "partial"}`;
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = c.who === "bot" ? "Presence" : c.who === "interpreter" ? `Interpreter (${c.language})` : "You";
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = c.text;
      li.append(who, text);
      return li;
    }),
  );
  list.scrollTop = list.scrollHeight;
}

function onCaption(data) {
  const who = data.who === "bot" || data.who === "interpreter" ? data.who : "caller";
  // each listener reads the interpretation in their own language only
  if (who === "interpreter" && data.language !== $("language").value) return;
  const entry = { who, text: String(data.text ?? ""), final: Boolean(data.final) };
  if (who === "interpreter") entry.language = data.language;
  // a partial replaces this speaker's previous partial in place; a final settles it
  const list = presence.captions;
  let open = -1;
  for (let i = list.length - 1; i >= 0; i--) {
    if (list[i].who === who && !list[i].final) {
      open = i;
      break;
    }
  }
  if (open >= 0) list[open] = entry;
  else if (entry.text) list.push(entry);
  if (list.length > MAX_CAPTIONS) list.splice(0, list.length - MAX_CAPTIONS);
  renderCaptions();
}

function onLatency(data) {
  const name = String(data.name ?? "?");
  const ms = Number(data.ms);
  if (!Number.isFinite(ms)) return;
  presence.latencies[name] = ms;
  const s = latencyStats.get(name) ?? { last: 0, sum: 0, n: 0 };
  s.last = ms;
  s.sum += ms;
  s.n += 1;
  latencyStats.set(name, s);
  $("latency-body").replaceChildren(
    ...[...latencyStats.entries()].map(([key, v]) => {
      const tr = document.createElement("tr");
      for (const cell of [key, v.last.toFixed(0), (v.sum / v.n).toFixed(0), String(v.n)]) {
        const td = document.createElement("td");
        td.textContent = cell;
        tr.append(td);
      }
      return tr;
    }),
  );
}

// background jobs by id, in dispatch order: queued -> running -> done | failed | cancelled
const jobs = new Map();

function onJob(data) {
  const id = String(data.job_id ?? "");
  if (!id) return;
  jobs.set(id, { kind: String(data.kind ?? "job"), status: String(data.status ?? "?"), title: String(data.title ?? ""), summary: String(data.summary ?? "") });
  presence.jobs = [...jobs.entries()].map(([job_id, j]) => ({ job_id, ...j }));
  $("jobs").replaceChildren(
    ...[...jobs.values()].map((j) => {
      const li = document.createElement("li");
      li.className = `job ${j.status}`;
      const status = document.createElement("span");
      status.className = "job-status";
      status.textContent = j.status;
      const text = document.createElement("span");
      text.textContent = j.status === "done" || j.status === "failed" ? j.summary || j.title : j.title;
      li.append(status, text);
      return li;
    }),
  );
}

function onMessage(raw) {
  let msg;
  try {
    msg = JSON.parse(raw);
  } catch {
    localMark("bad_message");
    return;
  }
  if (!msg || typeof msg !== "object" || msg.type !== "event") return;
  logEvent(msg);
  for (const listener of presence.listeners) {
    try {
      listener(msg);
    } catch (err) {
      console.error("presence event listener failed", err);
    }
  }
  const nested = msg.data && typeof msg.data === "object" ? msg.data : null;
  const data = nested ? { ...msg, ...nested, name: msg.name } : msg;
  if (data.name === "state" && BOT_STATES.has(data.state)) setState(data.state);
  else if (data.name === "caption") onCaption(data);
  else if (data.name === "job") onJob(data);
  else if (data.name === "latency") {
    // the measure's name: nested data.name, or a flat "measure"/"metric" field
    onLatency({ name: nested?.name ?? data.measure ?? data.metric ?? "latency", ms: data.ms });
  } else if (typeof data.ms === "number" && !PAGE_EVENTS.has(data.name)) {
    // CallEvent.to_json spreads data over the message, so a flat {"name": measure, "ms"}
    // overwrites "latency": treat any other event carrying "ms" as that measure
    onLatency({ name: data.name, ms: data.ms });
  }
}

// ------------------------------------------------------------------ WebRTC

// The bot looks at a few small frames a second (video_fps, video_max_width): sending more only
// costs both machines CPU (encoding here, decoding there) that the voice needs. The local
// preview keeps the camera's full size.
function videoEncoding(track, cfg) {
  const width = track.getSettings().width ?? 640;
  const maxWidth = cfg.video_max_width ?? 320;
  const fps = cfg.video_fps ?? 2;
  return {
    scaleResolutionDownBy: Math.max(1, width / maxWidth),
    maxFramerate: Math.max(1, Math.ceil(fps * 2)), // twice the sampling rate: room for jitter
  };
}

function gatheringComplete(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const finish = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", onState);
      pc.removeEventListener("icecandidate", onCandidate);
      resolve();
    };
    const onState = () => pc.iceGatheringState === "complete" && finish();
    const onCandidate = (e) => e.candidate === null && finish(); // end-of-candidates
    const timer = setTimeout(finish, timeoutMs);
    pc.addEventListener("icegatheringstatechange", onState);
    pc.addEventListener("icecandidate", onCandidate);
  });
}

function attachRemoteAudio(stream) {
  const el = $("remote-audio");
  el.srcObject = stream;
  el.play().catch(() => localMark("autoplay_blocked"));
  if (audioCtx) {
    // not connected to the destination: the <audio> element plays it, this only measures
    const source = audioCtx.createMediaStreamSource(stream);
    analyser = audioCtx.createAnalyser();
    analyser.fftSize = 1024;
    analyserBuf = new Float32Array(analyser.fftSize);
    source.connect(analyser);
  }
}

async function loadConfig() {
  const res = await fetch("/api/config", { cache: "no-store" });
  if (!res.ok) throw new JoinError(`http_${res.status}`, "could not read /api/config");
  presence.config = await res.json();
  const select = $("language");
  for (const lang of presence.config.interpret_languages ?? []) {
    const option = document.createElement("option");
    option.value = lang.code;
    option.textContent = `${lang.name} (${lang.code})`;
    select.append(option);
  }
  const wanted = params.get("language");
  if (wanted) select.value = wanted;
  return presence.config;
}

async function readError(res) {
  let body = null;
  try {
    body = await res.json();
  } catch {
    // not JSON (a proxy's error page): fall back to the status line
  }
  const err = body && body.error;
  return new JoinError(err?.code ?? `http_${res.status}`, err?.message ?? (res.statusText || "request failed"));
}

async function join() {
  clearError();
  setInCall(true);
  setState("connecting");
  // created inside the click handler so the autoplay policy lets it run
  audioCtx = audioCtx ?? new AudioContext();
  audioCtx.resume().catch(() => {});
  let pc = null;
  const mine = generation;
  try {
    const cfg = presence.config ?? (await loadConfig());
    const wantVideo = $("mode").value === "video";
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      video: wantVideo ? { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 15 } } : false,
    });
    if (mine !== generation) {
      for (const track of stream.getTracks()) track.stop(); // hung up while asking for devices
      return;
    }
    localStream = stream;
    if (wantVideo) {
      const preview = $("local-video");
      preview.srcObject = localStream;
      preview.hidden = false;
    }
    pc = new RTCPeerConnection({ iceServers: cfg.ice_servers ?? [] });
    presence.pc = pc;
    pc.addEventListener("connectionstatechange", () => {
      setConnection(pc.connectionState);
      localMark(`connection_${pc.connectionState}`);
      if (pc.connectionState === "failed" && presence.pc === pc) {
        showError("ice_failed", "the media connection failed (network or firewall)");
        teardown("error");
      }
    });
    pc.addEventListener("track", (e) => {
      if (e.track.kind === "audio") attachRemoteAudio(e.streams[0] ?? new MediaStream([e.track]));
    });
    // sendrecv audio: the mic goes out, the bot's voice comes back on the same m-line
    const mic = localStream.getAudioTracks()[0];
    if (!mic) throw new JoinError("no_microphone", "no microphone track was granted");
    pc.addTransceiver(mic, { direction: "sendrecv", streams: [localStream] });
    const cam = localStream.getVideoTracks()[0];
    if (cam) pc.addTransceiver(cam, { direction: "sendonly", streams: [localStream], sendEncodings: [videoEncoding(cam, cfg)] });
    // before createOffer, so the offer carries the SCTP m-line
    channel = pc.createDataChannel("events");
    channel.addEventListener("message", (e) => onMessage(e.data));
    channel.addEventListener("open", () => localMark("channel_open"));

    await pc.setLocalDescription(await pc.createOffer());
    await gatheringComplete(pc, GATHER_TIMEOUT_MS);
    const body = { sdp: pc.localDescription.sdp, type: "offer" };
    if (token) body.token = token;
    const room = $("room").value.trim();
    if (room) body.room = room;
    const language = $("language").value;
    if (language) {
      body.language = language;
      body.original = $("original").checked;
      if (!body.room) throw new JoinError("room_needed", "the interpreter serves a room: enter a room name");
    }
    const name = $("name").value.trim();
    if (name) {
      body.name = name;
      localStorage.setItem("presence.name", name);
    }
    const res = await fetch("/api/offer", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!res.ok) throw await readError(res);
    const answer = await res.json();
    if (mine !== generation) {
      deleteCall(answer.peer_id, answer.resource_token).catch(() => {}); // hung up while the offer was in flight
      return;
    }
    presence.callId = answer.call_id;
    presence.peerId = answer.peer_id;
    resourceToken = answer.resource_token ?? null;
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    localMark("joined", { call_id: answer.call_id, peer: answer.peer_id });
    if (!BOT_STATES.has(presence.state)) setState("connected");
  } catch (err) {
    if (mine !== generation) return; // hung up meanwhile: not an error
    const code = err.code ?? err.name ?? "error";
    showError(code, err.message || String(err));
    localMark("join_failed", { code });
    teardown("error");
  }
}

function teardown(finalState) {
  generation += 1;
  const pc = presence.pc;
  presence.pc = null;
  if (channel) channel.close();
  channel = null;
  if (pc) pc.close();
  if (localStream) for (const track of localStream.getTracks()) track.stop();
  localStream = null;
  const preview = $("local-video");
  preview.srcObject = null;
  preview.hidden = true;
  $("remote-audio").srcObject = null;
  analyser = null;
  presence.peerId = null;
  resourceToken = null;
  setConnection(pc ? "closed" : presence.connection);
  setState(finalState);
  setInCall(false);
}

function deleteCall(peerId, secret) {
  // keepalive lets the request outlive the page on unload; the resource token proves it is ours
  const headers = secret ? { Authorization: `Bearer ${secret}` } : {};
  return fetch(`/api/calls/${encodeURIComponent(peerId)}`, { method: "DELETE", headers, keepalive: true });
}

async function hangup() {
  const peerId = presence.peerId;
  const secret = resourceToken;
  teardown("ended");
  localMark("hangup");
  if (peerId) {
    try {
      const res = await deleteCall(peerId, secret);
      if (!res.ok && res.status !== 404) {
        const err = await readError(res);
        showError(err.code, err.message);
      }
    } catch (err) {
      showError("network", String(err));
    }
  }
}

// ------------------------------------------------------------------ level meter

function drawLevel() {
  // a rough dBFS-ish scale: -60 dB -> empty, 0 dB -> full
  const rms = presence.remoteLevel();
  const db = rms > 0 ? 20 * Math.log10(rms) : -100;
  const pct = Math.max(0, Math.min(100, ((db + 60) / 60) * 100));
  $("level").style.width = `${pct}%`;
  requestAnimationFrame(drawLevel);
}

// ------------------------------------------------------------------ start

function start() {
  const room = params.get("room");
  if (room) $("room").value = room;
  const name = params.get("name") || localStorage.getItem("presence.name");
  if (name) $("name").value = name;
  $("join-form").addEventListener("submit", (e) => {
    e.preventDefault();
    join();
  });
  $("hangup").addEventListener("click", () => hangup());
  window.addEventListener("pagehide", () => {
    if (presence.peerId) deleteCall(presence.peerId, resourceToken).catch(() => {});
  });
  if (!navigator.mediaDevices?.getUserMedia) {
    showError("insecure_context", "this browser blocks the microphone here: open the page over https or on localhost");
  }
  loadConfig()
    .then((cfg) => {
      localMark("config", { token_required: cfg.token_required });
      if (cfg.token_required && !token) {
        const notice = $("notice");
        notice.textContent = "This server needs a join link with a token (?token=...).";
        notice.hidden = false;
      }
    })
    .catch((err) => showError(err.code ?? "config", err.message));
  requestAnimationFrame(drawLevel);
}

start();
