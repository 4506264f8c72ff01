// The soak's Node application: HTTP (`GET /` names the worker, `POST /echo` streams the body
// back) and a WebSocket echo on `/ws`, with the graceful SIGTERM drain of examples/node/server.js.
// Like many real apps it also starts helper processes it never cleans up: one in its own process
// group, and one daemonised (`detached`: its own session), which only a subreaper can find.
'use strict';
const http = require('node:http');
const { spawn } = require('node:child_process');
const { WebSocketServer } = require('ws');

module.exports = function createServer(slot) {
  for (const detached of [false, true]) {
    spawn('sleep', ['86400'], { detached, stdio: 'ignore' }).unref();
  }
  const server = http.createServer((req, res) => {
    if (req.method === 'POST' && req.url === '/echo') {
      res.writeHead(200, { 'content-type': 'application/octet-stream' });
      req.pipe(res);
      return;
    }
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end(`worker ${slot} pid ${process.pid}\n`);
  });
  const sockets = new Set();
  let draining = false;
  server.on('connection', (c) => {
    sockets.add(c);
    c.on('close', () => {
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
    server.close();
    for (const s of sockets) {
      if (s.served && !s.busy) s.end();
      else if (!s.busy) setTimeout(() => s.end(), 2000).unref();
    }
    if (sockets.size === 0) process.exit(0);
  });
  const wss = new WebSocketServer({ server, path: '/ws', maxPayload: 16 * 1024 * 1024 });
  wss.on('connection', (ws) => ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary })));
  if (process.send) setInterval(() => process.connected && process.send({ type: 'heartbeat' }), 1000).unref();
  return server;
};
