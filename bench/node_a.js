// Service A as a Node.js `http` server (bench/topology.py starts it; see its docstring).
// GET /a/<id> calls B twice over a keep-alive agent: GET /b/<id> (B then calls Redis and
// PostgreSQL) and GET /c/<id> (B answers at once), in the way --variant says:
//   seq    await one call, then the other
//   all    Promise.all of the two
//   pool   Promise.all, but the agent has --pool sockets at most: calls queue, and a
//          freed socket is handed to another request's queued call
//   timer  a setTimeout(1 ms) first, then Promise.all (the calls start in a timer
//          callback, with no read of the request's own socket before them)
//   fresh  Promise.all without keep-alive: every call opens its own connection, and is
//          written once connected, after whatever the loop read meanwhile
// Ground truth: one JSON line per request (the id, and each call with the addresses of
// the socket it used), as the Python services write.
"use strict";
const http = require("http");
const fs = require("fs");

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : dflt;
}
const split = (hp) => { const i = hp.lastIndexOf(":"); return [hp.slice(0, i), +hp.slice(i + 1)]; };
const [host, port] = split(arg("listen"));
const bAddr = arg("b");
const [bHost, bPort] = split(bAddr);
const variant = arg("variant", "seq");
const pool = +arg("pool", "4");
const log = fs.openSync(arg("log"), "a");
process.title = "dt-svc-a-node";

const agent = variant === "fresh" ? false : new http.Agent({
  keepAlive: true, maxSockets: variant === "pool" ? pool : Infinity });

function call(path) {
  return new Promise((resolve) => {
    const rec = { proto: "http1", op: `GET ${path}` };
    const req = http.request({ host: bHost, port: bPort, path, agent, method: "GET" }, (res) => {
      const s = res.socket;
      if (variant === "fresh") res.on("end", () => s.destroy());  // B keeps it open otherwise
      rec.local = `${s.localAddress}:${s.localPort}`;
      rec.remote = bAddr;
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => { rec.status = res.statusCode; resolve([rec, Buffer.concat(chunks)]); });
    });
    req.on("error", (e) => { rec.error = String(e); resolve([rec, Buffer.from("{}")]); });
    req.end();
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function work(rid) {
  const b = `/b/${rid}`, c = `/c/${rid}`;
  if (variant === "seq") return [await call(b), await call(c)];
  if (variant === "timer") await sleep(1);
  return Promise.all([call(b), call(c)]);
}

const server = http.createServer(async (req, res) => {
  const m = /^\/a\/([A-Za-z0-9_-]+)$/.exec(req.url);
  if (!m) { res.writeHead(404); res.end('{"error":"not found"}'); return; }
  const rid = m[1], t0 = process.hrtime.bigint();
  const peer = `${req.socket.remoteAddress}:${req.socket.remotePort}`;
  const local = `${req.socket.localAddress}:${req.socket.localPort}`;
  const results = await work(rid);
  const calls = results.map((r) => r[0]);
  const ok = calls.every((c) => c.status === 200);
  fs.writeSync(log, JSON.stringify({ svc: "a", id: rid, pid: process.pid, tid: process.pid,
    peer, local, t0: String(t0), t1: String(process.hrtime.bigint()), calls }) + "\n");
  const body = results[0][1];
  res.writeHead(ok ? 200 : 502, { "Content-Type": "application/json",
                                   "Content-Length": body.length });
  res.end(body);
});
server.keepAliveTimeout = 60000;
server.listen(port, host, 511, () => { process.stdout.write("READY\n"); });
process.on("SIGTERM", () => process.exit(0));
