// Node's own cluster balancing, for comparison: node cluster.js PORT WORKERS rr|none
'use strict';
const cluster = require('cluster');
const path = require('path');
const [port, n, policy] = [process.argv[2], Number(process.argv[3] ?? 2), process.argv[4] ?? 'rr'];
cluster.schedulingPolicy = policy === 'none' ? cluster.SCHED_NONE : cluster.SCHED_RR;
cluster.setupPrimary({ exec: path.join(__dirname, 'hello.js') });
for (let i = 0; i < n; i++) cluster.fork({ LISTEN_PORT: port });
