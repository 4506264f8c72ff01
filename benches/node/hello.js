// The one Node worker every Node configuration of the benchmark runs, unchanged:
// - under a sticky primary or lb: takes connections from `process.on('message')`;
// - with LISTEN_PORT set: listens itself (cluster workers, nginx/HAProxy backends, direct).
// Answers every request with a short body naming its pid; /ws upgrades to a WebSocket (ws).
'use strict';
const http = require('http');
const body = `ok ${process.pid}\n`;
const server = http.createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) });
  res.end(body);
});
try {
  const { WebSocketServer } = require('ws');
  const wss = new WebSocketServer({ server, path: '/ws' });
  wss.on('connection', (ws) => ws.on('message', (d, b) => ws.send(d, { binary: b })));
} catch (_) {
  // ws not installed: HTTP only
}
process.on('message', (message, connection) => {
  if (message !== 'sticky-session:connection') return;
  server.emit('connection', connection);
  connection.resume();
});
if (process.env.LISTEN_PORT) server.listen(Number(process.env.LISTEN_PORT), '127.0.0.1');
