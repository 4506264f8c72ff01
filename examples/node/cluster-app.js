// The single-file cluster app of Node's documentation, unchanged: `node cluster-app.js` forks a
// worker per CPU that all listen on port 8000 (PORT), balanced by Node's primary.
// `lb -- node cluster-app.js` runs the same file: lb is the primary, the worker branch runs, and
// each client IP keeps reaching the same worker.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');
const numCPUs = require('node:os').availableParallelism();
const process = require('node:process');

if (cluster.isPrimary) {
  console.log(`Primary ${process.pid} is running`);

  // Fork workers.
  for (let i = 0; i < numCPUs; i++) {
    cluster.fork();
  }

  cluster.on('exit', (worker, code, signal) => {
    console.log(`worker ${worker.process.pid} died`);
  });
} else {
  // Workers can share any TCP connection
  // In this case it is an HTTP server
  http
    .createServer((req, res) => {
      res.writeHead(200);
      res.end(`hello world from worker ${cluster.worker.id} (pid ${process.pid})\n`);
    })
    .listen(Number(process.env.PORT ?? 8000));

  console.log(`Worker ${process.pid} started`);
}
