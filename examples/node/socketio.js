// A socket.io server worker for the sticky-session pattern. socket.io's default transports
// start with HTTP long-polling and then upgrade to WebSocket: every request of one client
// must reach the same worker, which is what sticky routing gives.
'use strict';
const http = require('http');
const { Server } = require('socket.io');

const httpServer = http.createServer();
const io = new Server(httpServer);
io.on('connection', (socket) => {
  socket.on('echo', (msg, ack) => ack({ msg, pid: process.pid, transport: socket.conn.transport.name }));
});

process.on('message', (message, connection) => {
  if (message !== 'sticky-session:connection') return;
  httpServer.emit('connection', connection);
  connection.resume();
});
