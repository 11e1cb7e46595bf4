// avatalk call page: one WebRTC call with a talking avatar.
//
// Media: the microphone goes up on an audio transceiver (sendrecv; the reply audio comes
// back on it), the avatar comes down on a recvonly video transceiver, and the JSON events
// of docs/protocol.md travel on a data channel labelled "events". No trickle ICE: the
// offer is POSTed once ICE gathering is complete.
//
// Page options (query string) and the window.avatalk test API: docs/web-client.md.
//
// Viewer mode (?view=SESSION&token=VIEWER_TOKEN): watch a render session (docs/protocol.md,
// "Render-only sessions") whose agent sends its audio over a WebSocket: no microphone,
// receive-only audio and video, POSTed to v1/webrtc/SESSION/viewers; the data channel only
// tells the page, by closing, that the session ended.

const params = new URLSearchParams(location.search);
const flag = (name, fallback = false) => {
  if (!params.has(name)) return fallback;
  const value = (params.get(name) || "").toLowerCase();
  return !["0", "false", "no", "off"].includes(value);
};

const options = {
  kiosk: flag("kiosk"),
  embed: flag("embed"),
  autostart: flag("autostart"),
  aec: flag("aec", true),
  greeting: flag("greeting", true),
  avatar: params.get("avatar") || "",
  videoSize: params.has("size") ? parseInt(params.get("size"), 10) : null,
  persona: parsePersona(params.get("persona")),
  showLatency: flag("latency"),
  text: flag("text", true),
  // A render session to watch (viewer mode); its viewer token comes as ?token=.
  view: params.get("view") || "",
  // A short-lived session token minted by the site's backend (POST /v1/tokens), when the
  // server has API keys. Sent as a Bearer header; removed from the address bar.
  token: params.get("token") || "",
};

if (options.token) {
  params.delete("token");
  const query = params.toString();
  history.replaceState(history.state, "", location.pathname + (query ? `?${query}` : "") + location.hash);
}

/** fetch() with the session token, if the page has one. */
function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  if (options.token) headers.set("Authorization", `Bearer ${options.token}`);
  return fetch(path, { ...init, headers });
}

function parsePersona(raw) {
  if (!raw) return null;
  try {
    const value = JSON.parse(raw);
    return value && typeof value === "object" && !Array.isArray(value) ? value : null;
  } catch {
    console.warn("avatalk: ignoring ?persona=, it is not a JSON object");
    return null;
  }
}

const $ = (id) => document.getElementById(id);
const el = {
  app: $("app"),
  tile: $("tile"),
  video: $("remote-video"),
  placeholder: $("placeholder"),
  placeholderInitial: $("placeholder-initial"),
  placeholderName: $("placeholder-name"),
  placeholderHint: $("placeholder-hint"),
  statePill: $("state-pill"),
  stateText: $("state-text"),
  stateLive: $("state-live"),
  conn: $("conn"),
  connText: $("conn-text"),
  picker: $("avatar-picker"),
  pickerWrap: $("picker-wrap"),
  start: $("start"),
  mute: $("mute"),
  micLevel: $("mic-level"),
  interrupt: $("interrupt"),
  hangup: $("hangup"),
  captions: $("captions"),
  captionsEmpty: $("captions-empty"),
  composer: $("composer"),
  textInput: $("text-input"),
  send: $("send"),
  latency: $("latency"),
  latencySummary: $("latency-summary"),
  latencyBody: document.querySelector("#latency-table tbody"),
  errorOverlay: $("error-overlay"),
  errorTitle: $("error-title"),
  errorMessage: $("error-message"),
  errorHint: $("error-hint"),
  retry: $("retry"),
  tapOverlay: $("tap-overlay"),
  tapStart: $("tap-start"),
  tapText: $("tap-text"),
  tapSub: $("tap-sub"),
  toast: $("toast"),
};

const mode = options.kiosk ? "kiosk" : options.embed ? "embed" : "call";
el.app.dataset.mode = mode;
document.documentElement.dataset.mode = mode;
if (!options.text || options.view) el.app.dataset.noText = "1";
if (options.view) el.app.dataset.viewer = "1";
// Kiosk and embed overlay the captions on the video.
if (mode !== "call") el.tile.insertBefore(el.captions, el.statePill);
if (options.showLatency) el.latency.open = true;

// ---- state and the test API ------------------------------------------------------------------

const STATE_LABELS = {
  idle: "Ready",
  connecting: "Connecting…",
  listening: "Listening",
  thinking: "Thinking",
  speaking: "Speaking",
  watching: "Watching",
  ended: "Call ended",
  error: "Not connected",
};

const call = {
  phase: "idle", // idle | connecting | connected | ended | error
  pc: null,
  dc: null,
  mic: null,
  sessionId: null,
  viewerId: null, // viewer mode: this page's id among the render session's viewers
  muted: false,
  statsTimer: null,
  disconnectTimer: null,
  retryTimer: null,
  generation: 0, // bumps at every start/stop so stale callbacks do nothing
  framesDecoded: 0,
  framesPresented: 0,
  audioContext: null,
  meterRaf: 0,
};

let config = { ice_servers: [], default_avatar: "ava", avatars: [] };

const avatalk = {
  /** idle | connecting | listening | thinking | speaking | ended | error */
  state: "idle",
  /** RTCPeerConnection.connectionState, or "new" before a call and "closed" after it. */
  connectionState: "new",
  sessionId: null,
  avatar: null,
  /** [{role: "user"|"assistant", turnId, text, final, interrupted, status}] in display order. */
  captions: [],
  /** The last `latency` event: {turn_id, marks_ms, first_frame_shown_ms}. */
  lastLatency: null,
  /** marks_ms.first_frame + this browser's delay to the next presented frame (ms), or null. */
  firstFrameShownMs: null,
  /** {message, kind} while an error is shown, else null. */
  error: null,
  /** The last 200 events received on the data channel. */
  events: [],
  muted: false,
  /** Frames the browser decoded on the avatar video track (inbound-rtp stats, polled). */
  framesDecoded: () => Math.max(call.framesDecoded, playbackFrames()),
  /** Frames presented (requestVideoFrameCallback), where the browser supports it. */
  framesPresented: () => call.framesPresented,
  start: () => startCall(),
  hangUp: () => hangUp(),
  send: (text) => sendText(text),
  interrupt: () => interrupt(),
  setMuted: (muted) => setMuted(muted),
  updatePersona: (persona) => sendEvent({ type: "session.update", session: { persona } }),
  options,
};
window.avatalk = avatalk;

function playbackFrames() {
  const quality = el.video.getVideoPlaybackQuality?.();
  return quality ? quality.totalVideoFrames : 0;
}

function postToParent(message) {
  if (!options.embed || window.parent === window) return;
  try {
    window.parent.postMessage({ source: "avatalk", ...message }, "*");
  } catch {
    /* a detached parent: nothing to tell */
  }
}

function setPhase(phase) {
  call.phase = phase;
  el.app.dataset.phase = phase;
  const inCall = phase === "connecting" || phase === "connected";
  el.start.hidden = inCall || phase === "error"; // an error has its own Retry button
  el.mute.hidden = !inCall || !!options.view;
  el.interrupt.hidden = !inCall || !!options.view;
  el.hangup.hidden = !inCall;
  el.picker.disabled = inCall;
  const canType = phase === "connected";
  el.textInput.disabled = !canType;
  el.send.disabled = !canType || !el.textInput.value.trim();
  el.interrupt.disabled = phase !== "connected";
  el.start.querySelector("span").textContent = options.view
    ? phase === "ended" ? "Watch again" : "Watch"
    : phase === "ended" ? "Call again" : "Start call";
  el.placeholderHint.textContent = {
    idle: "Start a call to talk face to face",
    connecting: "Connecting…",
    ended: "Call ended",
    error: "Not connected",
  }[phase] || "";
  if (phase !== "connected") setState(phase === "connecting" ? "connecting" : phase === "error" ? "error" : phase === "ended" ? "ended" : "idle");
  updateConn();
}

function setState(state) {
  avatalk.state = state;
  el.app.dataset.state = state;
  el.stateText.textContent = STATE_LABELS[state] || state;
  if (["listening", "thinking", "speaking"].includes(state)) el.stateLive.textContent = STATE_LABELS[state];
  el.interrupt.disabled = !(state === "thinking" || state === "speaking");
  postToParent({ type: "state", state });
}

function updateConn() {
  const cs = avatalk.connectionState;
  let text = "Not connected";
  let kind = "off";
  if (call.phase === "connecting") [text, kind] = ["Connecting…", "wait"];
  else if (call.phase === "connected") {
    if (cs === "disconnected") [text, kind] = ["Reconnecting…", "wait"];
    else [text, kind] = ["Connected", "on"];
  } else if (call.phase === "error") [text, kind] = ["Connection problem", "bad"];
  else if (call.phase === "ended") [text, kind] = ["Call ended", "off"];
  el.connText.textContent = text;
  el.conn.dataset.kind = kind;
}

// ---- avatars and configuration -----------------------------------------------------------

async function loadConfig() {
  try {
    const response = await api("v1/webrtc/config", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    config = { ...config, ...(await response.json()) };
  } catch (error) {
    console.warn("avatalk: GET v1/webrtc/config failed (%s); trying v1/avatars", error.message);
    try {
      const response = await api("v1/avatars", { cache: "no-store" });
      if (response.ok) {
        const body = await response.json();
        config.avatars = (body.avatars || []).map((a) => ({ id: a.id, display_name: a.display_name || a.id }));
      }
    } catch {
      /* offline or no avatars API: the default avatar is used */
    }
  }
  const avatars = Array.isArray(config.avatars) ? [...config.avatars] : [];
  const wanted = options.avatar || config.default_avatar || avatars[0]?.id || "ava";
  if (!avatars.some((a) => a.id === wanted)) avatars.unshift({ id: wanted, display_name: wanted });
  el.picker.replaceChildren(
    ...avatars.map((a) => {
      const option = document.createElement("option");
      option.value = a.id;
      option.textContent = a.display_name || a.id;
      return option;
    }),
  );
  el.picker.value = wanted;
  config.avatars = avatars;
  showAvatar(wanted);
}

function showAvatar(id) {
  const entry = config.avatars.find((a) => a.id === id);
  const name = (options.persona && options.persona.name) || entry?.display_name || id || "Avatar";
  avatalk.avatar = id;
  el.placeholderName.textContent = name;
  el.placeholderInitial.textContent = (name.trim()[0] || "A").toUpperCase();
  el.start.setAttribute("aria-label", `Start call with ${name}`);
  el.tapStart.setAttribute("aria-label", `Tap to start the call with ${name}`);
  el.tapSub.textContent = `Talk to ${name}`;
}

el.picker.addEventListener("change", () => showAvatar(el.picker.value));

// ---- the call ------------------------------------------------------------------------------

class CallError extends Error {
  constructor(message, { title = "Couldn't start the call", hint = "", retryable = true, kind = "error" } = {}) {
    super(message);
    this.title = title;
    this.hint = hint;
    this.retryable = retryable;
    this.kind = kind;
  }
}

async function startCall() {
  if (call.phase === "connecting" || call.phase === "connected") return;
  clearTimeout(call.retryTimer);
  const generation = ++call.generation;
  hideError();
  hideTap();
  avatalk.sessionId = null;
  avatalk.connectionState = "new";
  call.framesDecoded = call.framesPresented = 0;
  call.fatal = null;
  setPhase("connecting");
  try {
    await connect(generation);
  } catch (error) {
    if (generation !== call.generation) return;
    console.error("avatalk: call failed", error);
    teardown();
    showError(error instanceof CallError ? error : new CallError(error.message || String(error)));
  }
}

async function getMicrophone() {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new CallError("This browser cannot use a microphone here. Open the page over https (or on localhost) in a current browser.", {
      title: "Microphone unavailable",
      retryable: false,
      kind: "microphone",
    });
  }
  const audio = { echoCancellation: options.aec, noiseSuppression: options.aec, autoGainControl: options.aec, channelCount: 1 };
  try {
    return await navigator.mediaDevices.getUserMedia({ audio, video: false });
  } catch (error) {
    const denied = error.name === "NotAllowedError" || error.name === "SecurityError";
    const missing = error.name === "NotFoundError" || error.name === "OverconstrainedError";
    throw new CallError(
      denied
        ? "Microphone access was denied."
        : missing
          ? "No microphone was found."
          : `The microphone could not be opened (${error.name || "error"}: ${error.message}).`,
      {
        title: "Microphone needed",
        hint: denied
          ? "Allow the microphone for this site (the icon in the address bar), then press Retry."
          : "Connect a microphone or pick another input device, then press Retry.",
        kind: "microphone",
      },
    );
  }
}

async function connect(generation) {
  if (options.view) return watch(generation);
  const stale = () => generation !== call.generation;
  const mic = await getMicrophone();
  if (stale()) {
    mic.getTracks().forEach((t) => t.stop());
    return;
  }
  call.mic = mic;
  const micTrack = mic.getAudioTracks()[0];
  micTrack.enabled = !call.muted;
  startMeter(mic);

  const pc = new RTCPeerConnection({ iceServers: config.ice_servers || [] });
  call.pc = pc;
  pc.addTransceiver(micTrack, { direction: "sendrecv", streams: [mic] });
  pc.addTransceiver("video", { direction: "recvonly" });
  const dc = pc.createDataChannel("events");
  call.dc = dc;

  const remote = new MediaStream();
  el.video.srcObject = remote;
  pc.ontrack = (event) => {
    if (stale()) return;
    remote.addTrack(event.track);
    if (event.track.kind === "video") watchFrames(generation);
    playVideo();
  };
  pc.onconnectionstatechange = () => onConnectionState(pc, generation);
  dc.onmessage = (event) => {
    if (!stale()) onServerEvent(event.data);
  };
  dc.onopen = () => {
    if (stale()) return;
    setPhase("connected");
    setState("listening");
    postToParent({ type: "connected" });
  };
  dc.onclose = () => {
    if (!stale() && call.phase === "connected") endedByServer();
  };

  await pc.setLocalDescription(await pc.createOffer());
  await iceGatheringComplete(pc);
  if (stale()) return;

  const body = { sdp: pc.localDescription.sdp, type: pc.localDescription.type, greeting: options.greeting };
  const avatar = el.picker.value || options.avatar;
  if (avatar) body.avatar = avatar;
  if (options.videoSize) body.video_size = options.videoSize;
  if (options.persona) body.persona = options.persona;

  let response;
  try {
    response = await api("v1/webrtc/offer", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (error) {
    throw new CallError("The server could not be reached. Check your network connection.", { kind: "network" });
  }
  if (stale()) return;
  const answer = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = describeDetail(answer?.detail) || `${response.status} ${response.statusText}`.trim();
    const auth = response.status === 401 || response.status === 403;
    throw new CallError(detail, {
      title: response.status === 503 ? "The server is busy" : auth ? "Not authorised" : "The call was refused",
      hint:
        response.status === 503
          ? "All call slots are taken or the server is still starting. Try again in a moment."
          : auth
            ? "This server needs a session token from the site that sent you here (?token=...). Reload that page to get a fresh one."
            : "",
      kind: `http_${response.status}`,
      retryable: true,
    });
  }
  if (!answer || !answer.sdp) throw new CallError("The server's answer had no SDP.", { kind: "protocol" });
  call.sessionId = answer.session_id || null;
  avatalk.sessionId = call.sessionId;
  await pc.setRemoteDescription({ type: answer.type || "answer", sdp: answer.sdp });
  if (stale()) return;
  call.statsTimer = setInterval(() => pollStats(pc, generation), 500);
}

/** Viewer mode: receive-only audio + video of a render session; nothing is sent back. */
async function watch(generation) {
  const stale = () => generation !== call.generation;
  const pc = new RTCPeerConnection({ iceServers: config.ice_servers || [] });
  call.pc = pc;
  pc.addTransceiver("audio", { direction: "recvonly" });
  pc.addTransceiver("video", { direction: "recvonly" });
  // Nothing is sent on it: its closing is how the page learns that the render session ended
  // (the server hangs its viewers up), where the media transport would only say "disconnected".
  const dc = pc.createDataChannel("events");
  call.dc = dc;
  dc.onclose = () => {
    if (!stale() && call.phase === "connected") endedByServer();
  };
  const remote = new MediaStream();
  el.video.srcObject = remote;
  pc.ontrack = (event) => {
    if (stale()) return;
    remote.addTrack(event.track);
    if (event.track.kind === "video") watchFrames(generation);
    playVideo();
  };
  pc.onconnectionstatechange = () => {
    if (stale()) return;
    if (pc.connectionState === "connected") {
      setPhase("connected");
      setState("watching");
      postToParent({ type: "connected" });
    } else if (pc.connectionState === "closed" && call.phase === "connected") {
      endedByServer(); // the render session ended: the server hung up its viewers
      return;
    }
    onConnectionState(pc, generation);
  };
  await pc.setLocalDescription(await pc.createOffer());
  await iceGatheringComplete(pc);
  if (stale()) return;
  let response;
  try {
    response = await api(`v1/webrtc/${encodeURIComponent(options.view)}/viewers`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
    });
  } catch (error) {
    throw new CallError("The server could not be reached. Check your network connection.", { kind: "network" });
  }
  if (stale()) return;
  const answer = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = describeDetail(answer?.detail) || `${response.status} ${response.statusText}`.trim();
    const auth = response.status === 401 || response.status === 403;
    throw new CallError(detail, {
      title: auth ? "Not authorised" : response.status === 404 ? "Nothing to watch" : "Watching was refused",
      hint: auth ? "Ask the agent that runs the render session for a fresh viewer link (viewer tokens expire)." : "",
      kind: `http_${response.status}`,
      retryable: response.status !== 401 && response.status !== 403,
    });
  }
  if (!answer || !answer.sdp) throw new CallError("The server's answer had no SDP.", { kind: "protocol" });
  call.viewerId = answer.viewer_id || null;
  avatalk.sessionId = options.view;
  await pc.setRemoteDescription({ type: answer.type || "answer", sdp: answer.sdp });
  if (stale()) return;
  call.statsTimer = setInterval(() => pollStats(pc, generation), 500);
}

function describeDetail(detail) {
  if (!detail) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((item) => {
        if (typeof item === "string") return item;
        const where = Array.isArray(item.loc) ? item.loc.filter((p) => p !== "body").join(".") : "";
        return where ? `${where}: ${item.msg}` : item.msg || JSON.stringify(item);
      })
      .join("; ");
  }
  return JSON.stringify(detail);
}

function iceGatheringComplete(pc, timeoutMs = 5000) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      pc.removeEventListener("icecandidate", onCandidate);
      resolve();
    };
    const check = () => pc.iceGatheringState === "complete" && done();
    const onCandidate = (event) => event.candidate === null && done();
    // An unreachable STUN/TURN server can hold gathering for long; send what we have.
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
    pc.addEventListener("icecandidate", onCandidate);
  });
}

function onConnectionState(pc, generation) {
  if (generation !== call.generation) return;
  const state = pc.connectionState;
  avatalk.connectionState = state;
  updateConn();
  clearTimeout(call.disconnectTimer);
  if (state === "failed") {
    teardown();
    showError(
      new CallError("The media connection failed (ICE could not connect to the server).", {
        title: "Connection failed",
        hint: "A firewall or network may block the call. Behind NAT the server needs a TURN server (docs/web-client.md).",
        kind: "ice",
      }),
    );
  } else if (state === "disconnected") {
    toast("Connection interrupted, reconnecting…");
    call.disconnectTimer = setTimeout(() => {
      if (generation !== call.generation || pc.connectionState !== "disconnected") return;
      teardown();
      showError(new CallError("The connection to the server was lost.", { title: "Connection lost", kind: "ice" }));
    }, 6000);
  } else if (state === "connected") {
    hideToast();
  }
}

function teardown({ notifyServer = true } = {}) {
  call.generation++;
  clearInterval(call.statsTimer);
  clearTimeout(call.disconnectTimer);
  stopMeter();
  if (notifyServer && call.sessionId) {
    api(`v1/webrtc/${encodeURIComponent(call.sessionId)}`, { method: "DELETE", keepalive: true }).catch(() => {});
  }
  if (notifyServer && call.viewerId) {
    const path = `v1/webrtc/${encodeURIComponent(options.view)}/viewers/${encodeURIComponent(call.viewerId)}`;
    api(path, { method: "DELETE", keepalive: true }).catch(() => {});
  }
  call.sessionId = null;
  call.viewerId = null;
  try {
    call.dc?.close();
  } catch {}
  try {
    call.pc?.close();
  } catch {}
  call.mic?.getTracks().forEach((t) => t.stop());
  call.pc = call.dc = call.mic = null;
  el.video.srcObject = null;
  avatalk.connectionState = "closed";
  el.tile.classList.remove("has-video");
}

/** The server ended the call (its data channel closed, or a fatal error event). */
function endedByServer() {
  if (call.phase !== "connected") return;
  const fatal = call.fatal;
  call.fatal = null;
  teardown({ notifyServer: !fatal });
  closeOpenCaptions();
  if (fatal && (fatal.code === "idle_timeout" || fatal.code === "session_expired")) {
    setPhase("ended");
    toast(fatal.message, "info");
    postToParent({ type: "ended", reason: fatal.code });
    if (options.kiosk) showTap("Tap to start");
    return;
  }
  showError(
    new CallError(fatal?.message || (options.view ? "The render session ended." : "The server closed the call."), {
      title: fatal?.code === "server_shutdown" ? "The server is restarting" : "Call ended",
      kind: fatal?.code || "closed",
    }),
  );
}

function hangUp() {
  if (call.phase !== "connecting" && call.phase !== "connected") return;
  teardown();
  closeOpenCaptions();
  setPhase("ended");
  postToParent({ type: "hangup" });
  if (options.kiosk) showTap("Tap to start");
}

async function playVideo() {
  try {
    await el.video.play();
  } catch (error) {
    if (error.name === "NotAllowedError") {
      // Autoplay with sound blocked: one tap resumes it.
      showTap("Tap for sound", true);
    }
  }
}

// ---- video frames: counts, and the "first frame shown" estimate ------------------------------

function watchFrames(generation) {
  const video = el.video;
  if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) {
    video.addEventListener("loadeddata", () => el.tile.classList.add("has-video"), { once: true });
    return;
  }
  const onFrame = () => {
    if (generation !== call.generation) return;
    call.framesPresented++;
    if (ambient && call.framesPresented % 12 === 1) paintAmbient();
    if (call.framesPresented === 1 || !el.tile.classList.contains("has-video")) {
      el.tile.classList.add("has-video");
      if (video.videoWidth && video.videoHeight) {
        el.tile.style.setProperty("--video-aspect", `${video.videoWidth} / ${video.videoHeight}`);
      }
    }
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

// Kiosk: the bands beside (or above and below) a video that does not fill the screen take
// the colours of the video's own edges, sampled twice a second from a 16x16 thumbnail.
const ambient = mode === "kiosk" ? document.createElement("canvas") : null;
if (ambient) ambient.width = ambient.height = 16;

function paintAmbient() {
  const video = el.video;
  if (!video.videoWidth) return;
  try {
    const ctx = ambient.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(video, 0, 0, 16, 16);
    const px = ctx.getImageData(0, 0, 16, 16).data;
    const average = (indices) => {
      const sum = [0, 0, 0];
      for (const i of indices) for (let c = 0; c < 3; c++) sum[c] += px[4 * i + c];
      return `rgb(${sum.map((v) => Math.round(v / indices.length)).join(",")})`;
    };
    const range = Array.from({ length: 16 }, (_, i) => i);
    const sideways = el.tile.clientWidth / el.tile.clientHeight > video.videoWidth / video.videoHeight;
    el.tile.dataset.bands = sideways ? "x" : "y";
    const [a, b] = sideways
      ? [average(range.map((y) => y * 16)), average(range.map((y) => y * 16 + 15))]
      : [average(range), average(range.map((x) => 240 + x))];
    el.tile.style.setProperty("--edge-a", a);
    el.tile.style.setProperty("--edge-b", b);
  } catch {
    /* no frame yet */
  }
}

/** Resolves with the display time of the next video frame presented (performance.now() clock). */
function nextPresentedFrame(timeoutMs = 5000) {
  const video = el.video;
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(null), timeoutMs);
    if ("requestVideoFrameCallback" in video) {
      video.requestVideoFrameCallback((now, meta) => {
        clearTimeout(timer);
        resolve(meta?.expectedDisplayTime || now);
      });
    } else {
      // Without rVFC: the next animation frame after a newly decoded frame.
      const start = playbackFrames();
      const poll = (now) => {
        if (playbackFrames() > start) {
          clearTimeout(timer);
          resolve(now);
        } else requestAnimationFrame(poll);
      };
      requestAnimationFrame(poll);
    }
  });
}

async function pollStats(pc, generation) {
  if (generation !== call.generation) return;
  try {
    const report = await pc.getStats();
    report.forEach((stat) => {
      if (stat.type === "inbound-rtp" && (stat.kind === "video" || stat.mediaType === "video")) {
        if (typeof stat.framesDecoded === "number") call.framesDecoded = stat.framesDecoded;
        if (stat.jitterBufferEmittedCount) {
          call.jitterMs = (1000 * stat.jitterBufferDelay) / stat.jitterBufferEmittedCount;
        }
      }
    });
  } catch {
    /* closed meanwhile */
  }
}

// ---- microphone level (a ring around the mute button) ----------------------------------------

function startMeter(stream) {
  try {
    const AudioCtx = window.AudioContext || window.webkitAudioContext;
    if (!AudioCtx) return;
    const ctx = new AudioCtx();
    const source = ctx.createMediaStreamSource(stream);
    const analyser = ctx.createAnalyser();
    analyser.fftSize = 512;
    source.connect(analyser);
    const data = new Float32Array(analyser.fftSize);
    call.audioContext = ctx;
    let last = 0;
    const tick = (now) => {
      call.meterRaf = requestAnimationFrame(tick);
      if (now - last < 50) return;
      last = now;
      analyser.getFloatTimeDomainData(data);
      let sum = 0;
      for (let i = 0; i < data.length; i++) sum += data[i] * data[i];
      const rms = Math.sqrt(sum / data.length);
      const level = call.muted ? 0 : Math.min(1, Math.max(0, (20 * Math.log10(rms + 1e-9) + 60) / 50));
      el.micLevel.style.setProperty("--level", level.toFixed(2));
    };
    call.meterRaf = requestAnimationFrame(tick);
  } catch {
    /* a level meter is a nicety */
  }
}

function stopMeter() {
  cancelAnimationFrame(call.meterRaf);
  call.audioContext?.close().catch(() => {});
  call.audioContext = null;
  el.micLevel.style.setProperty("--level", "0");
}

// ---- events from the server ------------------------------------------------------------------

function onServerEvent(raw) {
  let event;
  try {
    event = JSON.parse(raw);
  } catch {
    return;
  }
  if (!event || typeof event.type !== "string") return;
  avatalk.events.push(event);
  if (avatalk.events.length > 200) avatalk.events.shift();
  switch (event.type) {
    case "session.created":
    case "session.updated":
      if (event.session?.id) avatalk.sessionId = avatalk.sessionId || event.session.id;
      break;
    case "state":
      if (call.phase === "connected") setState(event.state);
      break;
    case "input_audio_buffer.speech_started":
      // Earlier turns cut before their transcript came are over.
      avatalk.captions
        .filter((c) => c.role === "user" && !c.final && c.turnId !== event.turn_id)
        .forEach((c) => settleUserCaption(c.turnId));
      userCaption(event.turn_id, "", false);
      break;
    case "input_audio_buffer.speech_ignored":
      dropEmptyUserCaption();
      break;
    case "input_audio_transcription.partial":
      userCaption(event.turn_id, event.transcript || "", false);
      break;
    case "input_audio_transcription.completed":
      userCaption(event.turn_id, event.transcript || "", true);
      break;
    case "response.created":
      assistantCaption(event.turn_id);
      break;
    case "response.text.delta": {
      const caption = assistantCaption(event.turn_id);
      caption.text += event.delta || "";
      renderCaption(caption);
      break;
    }
    case "response.text.done": {
      const caption = assistantCaption(event.turn_id);
      if (typeof event.text === "string" && event.text) caption.text = event.text;
      renderCaption(caption);
      break;
    }
    case "response.interrupted": {
      const caption = findCaption("assistant", event.turn_id);
      if (caption) {
        caption.generated = caption.text;
        caption.text = event.spoken_text || "";
        caption.interrupted = true;
        caption.reason = event.reason;
        caption.final = true;
        renderCaption(caption);
      }
      break;
    }
    case "response.done": {
      const caption = findCaption("assistant", event.turn_id);
      if (caption) {
        caption.final = true;
        caption.status = event.status;
        if (event.status === "completed" && event.text && !caption.text) caption.text = event.text;
        if (event.status === "empty" && !caption.text) removeCaption(caption);
        else renderCaption(caption);
      }
      settleUserCaption(event.turn_id);
      break;
    }
    case "latency":
      onLatency(event);
      break;
    case "error":
      if (event.fatal) {
        // The server ends the session (idle, too long, shutting down): it says why first.
        call.fatal = event;
        toast(event.message || "The server is ending the call.", "error");
        if (event.code !== "server_shutdown") setTimeout(() => call.fatal === event && endedByServer(), 1500);
      } else if (event.code !== "no_response") {
        toast(event.message || event.code || "The server reported an error.", "error");
      }
      break;
    case "warning":
      console.warn("avatalk server warning:", event.code, event.message);
      break;
    default:
      break;
  }
}

// ---- captions --------------------------------------------------------------------------------

let captionSeq = 0;

function findCaption(role, turnId) {
  if (turnId === undefined || turnId === null) return null;
  for (let i = avatalk.captions.length - 1; i >= 0; i--) {
    const c = avatalk.captions[i];
    if (c.role === role && c.turnId === turnId) return c;
  }
  return null;
}

function newCaption(role, turnId, text = "") {
  const caption = { id: ++captionSeq, role, turnId, text, final: false, interrupted: false, status: null, node: null };
  avatalk.captions.push(caption);
  if (avatalk.captions.length > 200) {
    const old = avatalk.captions.shift();
    old.node?.remove();
  }
  return caption;
}

function userCaption(turnId, text, final) {
  let caption = findCaption("user", turnId);
  if (!caption && final) {
    // A transcript for a turn we did not see start: finish the open partial, if any.
    caption = [...avatalk.captions].reverse().find((c) => c.role === "user" && !c.final && !c.typed) || null;
    if (caption) caption.turnId = turnId;
  }
  if (!caption) caption = newCaption("user", turnId);
  if (caption.final && !final) return caption;
  if (text || final) caption.text = text;
  caption.final = final;
  if (final && !text.trim()) {
    removeCaption(caption);
    return caption;
  }
  renderCaption(caption);
  return caption;
}

function dropEmptyUserCaption(turnId) {
  for (let i = avatalk.captions.length - 1; i >= 0; i--) {
    const c = avatalk.captions[i];
    if (c.role === "user" && !c.text.trim() && (turnId === undefined || c.turnId === turnId || !c.final)) {
      removeCaption(c);
      return;
    }
  }
}

/** The turn is over: its user caption is final now, or goes if nothing was recognised. */
function settleUserCaption(turnId) {
  const caption = findCaption("user", turnId);
  if (!caption || caption.final) return;
  caption.final = true;
  if (caption.text.trim()) renderCaption(caption);
  else removeCaption(caption);
}

function assistantCaption(turnId) {
  return findCaption("assistant", turnId) || renderCaption(newCaption("assistant", turnId));
}

function removeCaption(caption) {
  const index = avatalk.captions.indexOf(caption);
  if (index >= 0) avatalk.captions.splice(index, 1);
  caption.node?.remove();
  el.captionsEmpty.hidden = avatalk.captions.length > 0;
}

function closeOpenCaptions() {
  for (const c of avatalk.captions) {
    if (!c.final) {
      c.final = true;
      if (!c.text.trim()) removeCaption(c);
      else renderCaption(c);
    }
  }
}

function renderCaption(caption) {
  if (!caption.node) {
    const node = document.createElement("div");
    node.className = `caption caption-${caption.role}`;
    node.dataset.role = caption.role;
    const who = document.createElement("span");
    who.className = "caption-who";
    who.textContent = caption.role === "user" ? "You" : el.placeholderName.textContent || "Assistant";
    const text = document.createElement("p");
    text.className = "caption-text";
    node.append(who, text);
    caption.node = node;
    el.captions.append(node);
  }
  const node = caption.node;
  node.dataset.turn = caption.turnId ?? "";
  node.classList.toggle("is-partial", !caption.final);
  node.classList.toggle("is-interrupted", caption.interrupted);
  node.classList.toggle("is-failed", caption.status === "failed");
  node.classList.toggle("is-empty", !caption.text.trim() && !caption.interrupted);
  node.classList.toggle("is-unspoken", caption.interrupted && !caption.text.trim());
  const text = node.querySelector(".caption-text");
  if (caption.interrupted) {
    text.replaceChildren();
    const spoken = document.createElement("span");
    spoken.className = "spoken";
    spoken.textContent = caption.text || "";
    const unsaid = (caption.generated || "").startsWith(caption.text) ? caption.generated.slice(caption.text.length) : "";
    text.append(spoken);
    if (unsaid.trim()) {
      const rest = document.createElement("span");
      rest.className = "unsaid";
      rest.setAttribute("aria-hidden", "true");
      rest.textContent = unsaid;
      text.append(rest);
    }
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = caption.reason === "new_input" ? "cut off" : "interrupted";
    text.append(" ", badge);
  } else {
    text.textContent = caption.text;
    if (!caption.text && caption.role === "assistant" && !caption.final) {
      const typing = document.createElement("span");
      typing.className = "typing";
      typing.setAttribute("aria-label", "typing");
      typing.append(document.createElement("i"), document.createElement("i"), document.createElement("i"));
      text.append(typing);
    } else if (!caption.text && caption.role === "user" && !caption.final) {
      text.textContent = "…";
    }
  }
  el.captionsEmpty.hidden = true;
  scrollCaptions();
  return caption;
}

let scrollQueued = false;
function scrollCaptions() {
  if (scrollQueued) return;
  scrollQueued = true;
  requestAnimationFrame(() => {
    scrollQueued = false;
    el.captions.scrollTop = el.captions.scrollHeight;
  });
}

// ---- latency ---------------------------------------------------------------------------------

const MARKS = [
  ["asr_final", "Transcript final"],
  ["llm_first_token", "LLM first token"],
  ["first_sentence", "First sentence"],
  ["tts_first_audio", "TTS first audio"],
  ["first_audio", "First audio sent"],
  ["first_frame", "First frame sent"],
  ["first_frame_shown", "First frame shown"],
];

async function onLatency(event) {
  const arrived = performance.now();
  const marks = event.marks_ms || {};
  const latest = { turn_id: event.turn_id, marks_ms: { ...marks }, first_frame_shown_ms: null };
  avatalk.lastLatency = latest;
  renderLatency(latest);
  const base = typeof marks.first_frame === "number" ? marks.first_frame : null;
  if (base === null) return;
  const generation = call.generation;
  const presented = await nextPresentedFrame();
  if (generation !== call.generation || avatalk.lastLatency !== latest || presented === null) return;
  latest.first_frame_shown_ms = Math.round((base + Math.max(0, presented - arrived)) * 10) / 10;
  avatalk.firstFrameShownMs = latest.first_frame_shown_ms;
  renderLatency(latest);
}

function renderLatency(latest) {
  const values = { ...latest.marks_ms, first_frame_shown: latest.first_frame_shown_ms };
  const max = Math.max(1, ...Object.values(values).filter((v) => typeof v === "number"));
  const pending = (key) => key === "first_frame_shown" && typeof values.first_frame === "number";
  const rows = MARKS.filter(([key]) => typeof values[key] === "number" || pending(key)).map(([key, label]) => {
    const value = values[key];
    const row = document.createElement("tr");
    row.dataset.mark = key;
    const name = document.createElement("th");
    name.scope = "row";
    name.textContent = label;
    const bar = document.createElement("td");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.setProperty("--w", typeof value === "number" ? `${Math.max(2, (100 * value) / max)}%` : "0%");
    bar.append(fill);
    const num = document.createElement("td");
    num.className = "num";
    num.textContent = typeof value === "number" ? `${Math.round(value)} ms` : "…";
    row.append(name, bar, num);
    return row;
  });
  el.latencyBody.replaceChildren(...rows);
  const headline = latest.first_frame_shown_ms ?? latest.marks_ms.first_frame ?? latest.marks_ms.first_audio;
  el.latencySummary.textContent = typeof headline === "number" ? `${Math.round(headline)} ms` : "—";
}

// ---- sending ---------------------------------------------------------------------------------

function sendEvent(event) {
  if (!call.dc || call.dc.readyState !== "open") return false;
  call.dc.send(JSON.stringify(event));
  return true;
}

function sendText(text) {
  text = (text || "").trim();
  if (!text) return false;
  if (!sendEvent({ type: "conversation.item.create", text })) return false;
  const caption = newCaption("user", null, text);
  caption.final = true;
  caption.typed = true;
  renderCaption(caption);
  return true;
}

function interrupt() {
  return sendEvent({ type: "response.cancel" });
}

function setMuted(muted) {
  call.muted = !!muted;
  avatalk.muted = call.muted;
  call.mic?.getAudioTracks().forEach((t) => (t.enabled = !call.muted));
  el.mute.setAttribute("aria-pressed", String(call.muted));
  const label = call.muted ? "Unmute microphone" : "Mute microphone";
  el.mute.setAttribute("aria-label", label);
  el.mute.title = label;
  el.app.dataset.muted = call.muted ? "1" : "0";
}

// ---- errors, overlays, toasts ----------------------------------------------------------------

let kioskBackoff = 5;

function showError(error) {
  setPhase("error");
  avatalk.error = { message: error.message, title: error.title, kind: error.kind };
  el.errorTitle.textContent = error.title;
  el.errorMessage.textContent = error.message;
  el.errorHint.textContent = error.hint || "";
  el.errorHint.hidden = !error.hint;
  el.errorOverlay.hidden = false;
  hideTap();
  el.retry.querySelector("span").textContent = "Retry";
  postToParent({ type: "error", message: error.message });
  if (options.kiosk && error.retryable && error.kind !== "microphone") {
    // A kiosk has nobody to press Retry: try again with a growing pause.
    let left = kioskBackoff;
    kioskBackoff = Math.min(60, kioskBackoff * 2);
    const tick = () => {
      if (call.phase !== "error") return;
      if (left <= 0) return startCall();
      el.retry.querySelector("span").textContent = `Retry (${left}s)`;
      left--;
      call.retryTimer = setTimeout(tick, 1000);
    };
    tick();
  }
  el.retry.focus({ preventScroll: true });
}

function hideError() {
  avatalk.error = null;
  el.errorOverlay.hidden = true;
}

function showTap(text, resumeOnly = false) {
  el.tapText.textContent = text;
  el.tapSub.hidden = resumeOnly;
  el.tapOverlay.hidden = false;
  el.tapOverlay.dataset.resume = resumeOnly ? "1" : "0";
  el.app.dataset.tap = "1";
}

function hideTap() {
  el.tapOverlay.hidden = true;
  delete el.app.dataset.tap;
}

let toastTimer = 0;
function toast(message, kind = "info") {
  el.toast.textContent = message;
  el.toast.dataset.kind = kind;
  el.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(hideToast, 5000);
}

function hideToast() {
  el.toast.hidden = true;
}

// ---- wiring ----------------------------------------------------------------------------------

el.start.addEventListener("click", () => startCall());
el.retry.addEventListener("click", () => {
  kioskBackoff = 5;
  startCall();
});
el.hangup.addEventListener("click", () => hangUp());
el.interrupt.addEventListener("click", () => interrupt());
el.mute.addEventListener("click", () => setMuted(!call.muted));
el.tapStart.addEventListener("click", () => {
  if (el.tapOverlay.dataset.resume === "1") {
    hideTap();
    el.video.play().catch(() => {});
  } else startCall();
});
el.textInput.addEventListener("input", () => {
  el.send.disabled = call.phase !== "connected" || !el.textInput.value.trim();
});
el.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  if (sendText(el.textInput.value)) {
    el.textInput.value = "";
    el.send.disabled = true;
  }
});
document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return;
  if (event.key === "Escape" && (avatalk.state === "speaking" || avatalk.state === "thinking")) interrupt();
});
window.addEventListener("pagehide", () => {
  if (call.sessionId || call.viewerId) teardown();
});
window.addEventListener("message", (event) => {
  // embed.js asks the page to hang up before it removes the iframe.
  if (event.source === window.parent && event.data?.source === "avatalk-embed" && event.data.type === "hangup") hangUp();
});

/** True when the browser would play audio without a user gesture right now. */
async function autoplayAllowed() {
  if (navigator.getAutoplayPolicy) {
    try {
      return navigator.getAutoplayPolicy("mediaelement") === "allowed";
    } catch {}
  }
  const AudioCtx = window.AudioContext || window.webkitAudioContext;
  if (!AudioCtx) return true;
  const ctx = new AudioCtx();
  const running = ctx.state === "running";
  ctx.close().catch(() => {});
  return running;
}

async function init() {
  setPhase("idle");
  setMuted(false);
  await loadConfig();
  if (options.autostart) {
    if (await autoplayAllowed()) startCall();
    else showTap("Tap to start");
  } else if (options.kiosk) {
    showTap("Tap to start");
  }
}

init();
