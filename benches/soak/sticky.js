// Sticky-session worker (the classic pattern): the primary — here lb — hands it connections.
'use strict';
const server = require('./server.js')(process.env.LB_WORKER_ID ?? '?');
process.on('message', (message, connection) => {
  if (message !== 'sticky-session:connection' || !connection) return;
  server.emit('connection', connection);
  connection.resume();
});
