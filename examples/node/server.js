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
server.on('connection', (c) => {
  activeConnections++;
  c.on('close', () => activeConnections--);
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
  setInterval(() => process.send({ cmd: 'stats', data: { activeConnections, totalRequests } }), 200).unref();
}
if (process.send) {
  setInterval(() => process.send({ type: 'heartbeat' }), 1000).unref();
}
