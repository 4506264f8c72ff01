// A plain http + ws server written for the classic sticky-session pattern.
// Nothing in it knows about lb: the same file runs under a Node `cluster` primary
// (see primary.js) or, unchanged, under `lb -- node server.js`.
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const slot = process.env.LB_WORKER_ID ?? process.env.WORKER_ID ?? '?';
// How this worker reports its counts: "stats" (periodic {cmd:'stats'}), "request" (one
// {type:'request'} per request) or "none".
const report = process.env.REPORT ?? 'stats';
let totalRequests = 0;
let activeConnections = 0;

const server = http.createServer((req, res) => {
  totalRequests++;
  if (report === 'request' && process.send) process.send({ type: 'request' });
  if (req.method === 'POST' && req.url === '/echo') {
    res.writeHead(200, { 'content-type': 'application/octet-stream' });
    req.pipe(res);
    return;
  }
  if (req.url === '/whoami') {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ slot, pid: process.pid, remoteAddress: req.socket.remoteAddress, served: totalRequests }));
    return;
  }
  res.writeHead(200, { 'content-type': 'text/plain' });
  res.end(`worker ${slot} pid ${process.pid}\n`);
});
// Graceful drain: lb sends SIGTERM on shutdown and rolling restart, and no new connections after
// it. Finish what is open — including a connection handed over just before the signal whose
// request has not been read yet — then exit.
const sockets = new Set();
let draining = false;
server.on('connection', (c) => {
  activeConnections++;
  sockets.add(c);
  c.on('close', () => {
    activeConnections--;
    sockets.delete(c);
    if (draining && sockets.size === 0) process.exit(0);
  });
});
server.on('request', (req, res) => {
  req.socket.busy = true;
  res.on('finish', () => {
    req.socket.busy = false;
    req.socket.served = true;
    if (draining) req.socket.end();
  });
});
process.on('SIGTERM', () => {
  draining = true;
  for (const s of sockets) {
    if (s.served && !s.busy) s.end(); // idle keep-alive connection
    else if (!s.busy) setTimeout(() => s.end(), 2000).unref(); // request not read yet
  }
  if (sockets.size === 0) process.exit(0);
});

const wss = new WebSocketServer({ server, path: '/ws', maxPayload: 16 * 1024 * 1024 });
wss.on('connection', (ws) => ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary })));

// The sticky-session worker side: the primary hands us raw connections.
process.on('message', (message, connection) => {
  if (message !== 'sticky-session:connection') return;
  server.emit('connection', connection);
  connection.resume();
});

if (process.send && report === 'stats') {
  setInterval(() => process.connected && process.send({ cmd: 'stats', data: { activeConnections, totalRequests } }), 200).unref();
}
if (process.send) {
  setInterval(() => process.connected && process.send({ type: 'heartbeat' }), 1000).unref();
}
