import type { IceServer } from "./gen/icegate/v1/credentials_pb.js";

/** One entry of `new RTCPeerConnection({iceServers})` (W3C `RTCIceServer`). */
export interface RtcIceServer {
  urls: string[];
  username?: string;
  credential?: string;
}

/**
 * The `iceServers` value a browser takes, as plain JSON-ready objects: STUN entries carry only
 * `urls`; TURN entries add `username` and `credential`.
 */
export function rtcIceServers(servers: Iterable<IceServer>): RtcIceServer[] {
  const result: RtcIceServer[] = [];
  for (const server of servers) {
    const entry: RtcIceServer = { urls: [...server.urls] };
    if (server.username || server.credential) {
      entry.username = server.username;
      entry.credential = server.credential;
    }
    result.push(entry);
  }
  return result;
}
