// socket.io over several worker processes with @socket.io/cluster-adapter, as its docs write it:
// one file, the primary calls setupPrimary() and forks, each worker listens on the port.
// `lb -- node socketio-cluster.js` runs it unchanged: lb relays the adapter's messages between
// the workers (what setupPrimary() does) and keeps each client on one worker (sticky), so
// long-polling and the upgrade to WebSocket work and io.emit() reaches every client.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');
const { Server } = require('socket.io');
const { createAdapter, setupPrimary } = require('@socket.io/cluster-adapter');
const port = Number(process.env.PORT ?? 3000);

if (cluster.isPrimary) {
  setupPrimary();
  for (let i = 0; i < require('node:os').availableParallelism(); i++) cluster.fork();
} else {
  const httpServer = http.createServer();
  const io = new Server(httpServer);
  io.adapter(createAdapter());
  io.on('connection', (socket) => {
    socket.emit('hello', { worker: cluster.worker.id, pid: process.pid });
    // Any client can ask for a broadcast to every client, on every worker.
    socket.on('shout', (txt) => io.emit('broadcast', { from: cluster.worker.id, pid: process.pid, txt }));
    // Binary crosses workers as binary with `lb --serialization advanced` (socket.io's docs ask
    // for Node's advanced serialization with this adapter).
    socket.on('shoutbin', (n) => io.emit('bin', Buffer.from(Array.from({ length: n }, (_, i) => (i * 7) % 256))));
  });
  httpServer.listen(port);
}
