// The Node `cluster` + sticky-session primary that `lb -- node server.js` replaces.
// Usage: node primary.js [port] [workers] [worker-file]
'use strict';
const cluster = require('cluster');
const net = require('net');
const path = require('path');

const port = Number(process.argv[2] ?? 8000);
const n = Number(process.argv[3] ?? require('os').availableParallelism());
const file = path.resolve(process.argv[4] ?? path.join(__dirname, 'server.js'));

cluster.setupPrimary({ exec: file });
const workers = [];
for (let i = 0; i < n; i++) workers.push(cluster.fork({ WORKER_ID: String(i) }));

// Hash the client IP onto a worker (the classic sticky-session recipe).
function workerIndex(ip) {
  let s = '';
  for (const c of ip) if (c >= '0' && c <= '9') s += c;
  return Number(s) % n;
}

net
  .createServer({ pauseOnConnect: true }, (connection) => {
    workers[workerIndex(connection.remoteAddress ?? '')].send('sticky-session:connection', connection);
  })
  .listen(port, '127.0.0.1', () => console.log(`primary listening on 127.0.0.1:${port}`));
