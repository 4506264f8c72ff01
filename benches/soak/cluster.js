// A single-file cluster app (Node's cluster guide shape): the primary forks, workers listen().
// Under `lb -- node cluster.js` lb is the primary and the worker branch runs.
'use strict';
const cluster = require('node:cluster');
if (cluster.isPrimary) {
  for (let i = 0; i < require('node:os').availableParallelism(); i++) cluster.fork();
} else {
  const slot = process.env.LB_WORKER_ID ?? String(cluster.worker.id - 1);
  require('./server.js')(slot).listen(Number(process.env.PORT ?? 8000));
}
