// The demo page: a relay-only WebRTC call to the provider, started by the page's backend.
// No build step, no library: what a browser offers (RTCPeerConnection, fetch, getStats).
"use strict";

const $ = (id) => document.getElementById(id);
const USER = { "X-User-Id": "demo-user" };  // stands in for the backend's own sign-in
let pc = null;
let channel = null;
let sessionId = "";
let statsTimer = null;

function show(id, text, data) {
  $(id).textContent = text;
  if (data !== undefined) $(id).dataset.value = data;
}

async function post(path, body) {
  const answer = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...USER },
    body: JSON.stringify(body || {}),
  });
  const json = await answer.json().catch(() => ({}));
  if (!answer.ok) {
    // The backend's error body (icegate.http_error): a kind, never a key.
    const what = json.error || json.detail || "request failed";
    throw new Error(`${path}: HTTP ${answer.status} ${typeof what === "string" ? what : JSON.stringify(what)}`);
  }
  return json;
}

function gatheringComplete(connection, seconds) {
  // A provider call takes one offer: it must hold every candidate (here: the relay one).
  if (connection.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (connection.iceGatheringState === "complete") {
        connection.removeEventListener("icegatheringstatechange", done);
        resolve();
      }
    };
    connection.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, seconds * 1000);
  });
}

async function candidateInUse(connection) {
  // The local candidate of the selected pair: "relay" when the call goes through coturn.
  const stats = await connection.getStats();
  let pair = null;
  stats.forEach((report) => {
    if (report.type === "transport" && report.selectedCandidatePairId) {
      pair = stats.get(report.selectedCandidatePairId);
    }
  });
  if (!pair) {
    stats.forEach((report) => {
      if (report.type === "candidate-pair" && report.nominated && report.state === "succeeded") pair = report;
    });
  }
  return pair ? stats.get(pair.localCandidateId) || null : null;
}

async function showAudio(connection) {
  // What arrived on the provider's audio track (through coturn, like everything else).
  const stats = await connection.getStats();
  stats.forEach((report) => {
    if (report.type === "inbound-rtp" && report.kind === "audio") {
      show("audio", `${report.packetsReceived} packets, ${report.bytesReceived} bytes`,
           String(report.packetsReceived));
    }
  });
}

function received(event) {
  const item = document.createElement("li");
  item.dataset.type = event.type || "";
  item.textContent = event.type || "(no type)";
  if (event.type === "session.created" && event.session) {
    item.textContent += ` ${event.session.id || ""} ${event.session.model || ""}`;
  }
  if (event.type === "response.output_audio_transcript.delta") {
    item.textContent += ` ${JSON.stringify(event.delta || "")}`;
    $("transcript").textContent += event.delta || "";
  }
  $("events").append(item);
  $("events").scrollTop = $("events").scrollHeight;
}

async function start() {
  $("start").disabled = true;
  show("error", "");
  show("session-state", "starting");
  $("events").replaceChildren();
  show("audio", "none", "0");
  $("transcript").textContent = "";
  try {
    const { iceServers } = await post("/api/ice-servers");
    pc = new RTCPeerConnection({ iceServers, iceTransportPolicy: "relay" });
    pc.addEventListener("connectionstatechange", async () => {
      show("connection-state", pc.connectionState, pc.connectionState);
      if (pc.connectionState === "connected") {
        const connection = pc;
        clearInterval(statsTimer);
        statsTimer = setInterval(() => showAudio(connection).catch(() => {}), 500);
        const local = await candidateInUse(pc);
        if (local) {
          show("candidate-type", `${local.candidateType} (${local.relayProtocol || local.protocol}, ${local.address}:${local.port})`,
               local.candidateType);
        }
      }
    });
    channel = pc.createDataChannel("oai-events");
    channel.addEventListener("message", (message) => {
      try { received(JSON.parse(message.data)); } catch { received({ type: "(not JSON)" }); }
    });
    pc.addEventListener("track", (event) => {
      $("voice").srcObject = event.streams[0] || new MediaStream([event.track]);
    });
    pc.addTransceiver("audio", { direction: "recvonly" });
    await pc.setLocalDescription(await pc.createOffer());
    await gatheringComplete(pc, 10);
    if (!pc.localDescription.sdp.includes(" typ relay")) {
      throw new Error("no relay candidate: is coturn running, and does it take the TURN credential?");
    }
    const call = await post("/api/realtime-call", { sdp: pc.localDescription.sdp });
    sessionId = call.sessionId;
    show("session-id", sessionId, sessionId);
    show("session-state", "active", "active");
    await pc.setRemoteDescription(call.answer);
    $("stop").disabled = false;
  } catch (error) {
    show("error", String(error.message || error));
    await stop();
  }
}

async function stop() {
  $("stop").disabled = true;
  clearInterval(statsTimer);
  if (channel) channel.close();
  if (pc) {
    pc.close();
    show("connection-state", "closed", "closed");
  }
  pc = channel = null;
  const ending = sessionId;
  sessionId = "";
  if (ending) {
    try {
      await post(`/api/realtime-session/${encodeURIComponent(ending)}/end`);
      show("session-state", "ended", "ended");
    } catch (error) {
      show("error", String(error.message || error));
    }
  } else {
    show("session-state", "not started");
  }
  $("start").disabled = false;
}

$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
// Leaving the page ends the session too (its concurrency slot is the project's).
window.addEventListener("pagehide", () => {
  if (sessionId) navigator.sendBeacon(`/api/realtime-session/${encodeURIComponent(sessionId)}/end`);
});
