// FDB bench harness page code: one call to the bot from headless Chromium, driven by
// presence/bench/fdb/chromium.py (read its docstring for the clocks). Injected into a page of
// the bot's own origin, so the offer is a same-origin fetch.
//
// Sending: the input and the live injections are AudioBufferSourceNodes scheduled at exact
// AudioContext times into a MediaStreamAudioDestinationNode whose track is sent.
// Receiving: every RTP packet of the bot's audio is kept with its arrival time and RTP
// timestamp (encoded insertable streams; Python decodes and places them), and the remote
// track is also recorded as the page plays it (AudioWorklet, by context frame).
// Clock: the worklet reads the wall clock at every render quantum (see fdb.clock).
// The bot's data-channel messages go to Python through the exposed function fdbEvent.

(() => {
  const WORKLET = `
class FdbRecorder extends AudioWorkletProcessor {
  constructor() {
    super();
    this.size = 4096; // frames per message (~85 ms)
    this.buf = new Float32Array(this.size);
    this.fill = 0;
    this.start = 0; // context frame of buf[0]
    this.lag = Infinity; // min over this message's quanta of wall clock - render position (ms)
  }
  process(inputs) {
    // Date.now() (performance is not exposed in worklets) read as the quantum at currentFrame
    // is rendered: wall - context time. The context renders 10 ms callbacks at once, so the
    // minimum is the earliest a quantum was rendered relative to its context time.
    const lag = Date.now() - (currentFrame / sampleRate) * 1000;
    if (lag < this.lag) this.lag = lag;
    const input = inputs[0];
    const ch = input && input.length ? input[0] : null;
    const n = ch ? ch.length : 128;
    if (this.fill === 0) this.start = currentFrame;
    if (ch) this.buf.set(ch, this.fill);
    else this.buf.fill(0, this.fill, this.fill + n);
    this.fill += n;
    if (this.fill + 128 > this.size) {
      const data = this.buf.slice(0, this.fill);
      this.port.postMessage({ start: this.start, lag: this.lag, data }, [data.buffer]);
      this.fill = 0;
      this.lag = Infinity;
    }
    return true;
  }
}
registerProcessor("fdb-recorder", FdbRecorder);
`;

  const RATE = 48000;
  const GATHER_TIMEOUT_MS = 5000;

  function decode(b64) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const pcm = new Int16Array(bytes.buffer);
    const out = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
    return out;
  }

  function base64(bytes) {
    let bin = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(bin);
  }

  function encode(samples) {
    const pcm = new Int16Array(samples.length);
    for (let i = 0; i < samples.length; i++) {
      pcm[i] = Math.round(Math.max(-1, Math.min(1, samples[i])) * 32767);
    }
    return base64(new Uint8Array(pcm.buffer));
  }

  function gatheringComplete(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const finish = () => {
        clearTimeout(timer);
        resolve();
      };
      const timer = setTimeout(finish, GATHER_TIMEOUT_MS); // send what was gathered
      pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && finish());
      pc.addEventListener("icecandidate", (e) => e.candidate === null && finish());
    });
  }

  const fdb = {
    ctx: null,
    pc: null,
    dest: null,
    recorder: null,
    remote: null,
    buffers: {}, // name -> AudioBuffer (the input and the injection clips)
    chunks: [], // played-out audio as recorded: {start: context frame, data}
    lags: [], // [context frame, min wall ms - context ms] per recorder message
    packets: [], // received RTP packets: [arrival perf ms, rtp timestamp, sequence number, payload]
    resource: null,
    resourceToken: null,
    state: "new",

    async setup(clips) {
      const ctx = (this.ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" }));
      await ctx.resume();
      for (const [name, b64] of Object.entries(clips)) {
        const samples = decode(b64);
        const buffer = ctx.createBuffer(1, Math.max(1, samples.length), RATE);
        buffer.copyToChannel(samples, 0);
        this.buffers[name] = buffer;
      }
      const url = URL.createObjectURL(new Blob([WORKLET], { type: "application/javascript" }));
      await ctx.audioWorklet.addModule(url);
      // Mono all the way: what is sent is what input.wav holds.
      this.dest = new MediaStreamAudioDestinationNode(ctx, { channelCount: 1, channelCountMode: "explicit" });
      this.recorder = new AudioWorkletNode(ctx, "fdb-recorder", {
        numberOfInputs: 1,
        numberOfOutputs: 1,
        channelCount: 1,
        channelCountMode: "explicit",
      });
      this.recorder.port.onmessage = (e) => {
        this.chunks.push({ start: e.data.start, data: e.data.data });
        this.lags.push([e.data.start, e.data.lag]);
      };
      // A worklet runs only while the destination pulls it: connect it through a muted gain.
      this.recorder.connect(new GainNode(ctx, { gain: 0 })).connect(ctx.destination);
      return { baseLatency: ctx.baseLatency, outputLatency: ctx.outputLatency };
    },

    keepPackets(receiver) {
      // Encoded insertable streams: see every packet before the jitter buffer, pass it on as is.
      const { readable, writable } = receiver.createEncodedStreams();
      const packets = this.packets;
      readable
        .pipeThrough(
          new TransformStream({
            transform(frame, controller) {
              const md = frame.getMetadata();
              const arrived = typeof md.receiveTime === "number" ? md.receiveTime : performance.now();
              packets.push([arrived, md.rtpTimestamp, md.sequenceNumber ?? null, new Uint8Array(frame.data.slice(0))]);
              controller.enqueue(frame);
            },
          }),
        )
        .pipeTo(writable)
        .catch(() => {});
    },

    async connect(offer) {
      // encodedInsertableStreams makes every sender and receiver wait for a pipe of its own.
      const pc = (this.pc = new RTCPeerConnection({ iceServers: [], encodedInsertableStreams: true }));
      const stream = this.dest.stream;
      const sender = pc.addTrack(stream.getAudioTracks()[0], stream);
      const out = sender.createEncodedStreams();
      out.readable.pipeTo(out.writable).catch(() => {});
      const channel = pc.createDataChannel("events");
      channel.onmessage = (e) => {
        if (typeof e.data === "string") window.fdbEvent(e.data);
      };
      pc.addEventListener("connectionstatechange", () => (this.state = pc.connectionState));
      pc.ontrack = (e) => {
        if (e.track.kind !== "audio" || this.remote) return;
        this.keepPackets(e.receiver);
        const remote = (this.remote = e.streams[0] || new MediaStream([e.track]));
        // Chrome decodes remote audio only while a media element plays the stream (muted:
        // nothing is heard anyway); WebAudio then records it as the page plays it.
        const el = document.createElement("audio");
        el.muted = true;
        el.autoplay = true;
        el.srcObject = remote;
        document.body.appendChild(el);
        el.play().catch(() => {});
        this.ctx.createMediaStreamSource(remote).connect(this.recorder);
      };
      await pc.setLocalDescription(await pc.createOffer());
      await gatheringComplete(pc);
      const res = await fetch("/api/offer", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", ...offer }),
      });
      const answer = await res.json().catch(() => ({}));
      if (!res.ok) throw new Error(`offer refused: HTTP ${res.status}: ${JSON.stringify(answer)}`);
      this.resource = "/api/calls/" + encodeURIComponent(answer.peer_id);
      this.resourceToken = answer.resource_token || null; // hang-up needs the caller's own token
      await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
      return { callId: answer.call_id, peerId: answer.peer_id };
    },

    clock(fromIndex, withPerf) {
      // The worklet's render timings since fromIndex and, when asked, performance.now()'s
      // offset to the wall clock (ms): Date.now() floors to whole milliseconds, so the
      // maximum over a 2 ms busy loop (one tick at least) is exact to a tenth of one. The
      // loop stalls the page, so it is asked for only outside the measured part.
      let perf = null;
      if (withPerf) {
        perf = -Infinity;
        const t = performance.now();
        while (performance.now() - t < 2) perf = Math.max(perf, Date.now() - performance.now());
      }
      return { lags: this.lags.slice(fromIndex), perf };
    },

    play(name, when) {
      // Start a clip at context time `when` (or as soon as safely possible); returns the
      // context frame of its first sample, on a render-quantum boundary.
      const ctx = this.ctx;
      // Never in the past (it would start late, unseen); the render thread may be working on
      // the next 10 ms callback meanwhile.
      const earliest = ctx.currentTime + 0.03;
      const at = Math.ceil((Math.max(when, earliest) * RATE) / 128) * 128;
      const src = new AudioBufferSourceNode(ctx, { buffer: this.buffers[name] });
      src.connect(this.dest);
      src.start(at / RATE);
      return at;
    },

    received(fromIndex) {
      // Received packets since fromIndex, payloads as base64.
      return this.packets.slice(fromIndex).map(([t, rtp, seq, data]) => [t, rtp, seq, base64(data)]);
    },

    async played(startFrame, frames) {
      // The played-out samples at context frames [startFrame, startFrame + frames), as base64
      // int16; waits (up to 5 s) until they have all been rendered.
      const end = startFrame + frames;
      const covered = () => {
        const last = this.chunks[this.chunks.length - 1];
        return last && last.start + last.data.length >= end;
      };
      const deadline = performance.now() + 5000;
      while (!covered() && performance.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      const out = new Float32Array(frames);
      for (const { start, data } of this.chunks) {
        const lo = Math.max(start, startFrame);
        const hi = Math.min(start + data.length, end);
        if (hi > lo) out.set(data.subarray(lo - start, hi - start), lo - startFrame);
      }
      return encode(out);
    },

    async hangup() {
      const resource = this.resource;
      const headers = this.resourceToken ? { Authorization: `Bearer ${this.resourceToken}` } : {};
      this.resource = this.resourceToken = null;
      if (this.pc) this.pc.close();
      if (this.ctx) await this.ctx.close();
      if (!resource) return null;
      const res = await fetch(resource, { method: "DELETE", headers }).catch(() => null);
      return res ? res.status : null;
    },
  };
  window.fdb = fdb;
})();
