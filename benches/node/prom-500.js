// A prom-client cluster worker with 500 series of its own (a labelled counter and gauge, 250
// label values each), for benches/appmetrics.py. No default metrics: the series count is exact.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');
const client = require('prom-client');
new client.AggregatorRegistry();
if (cluster.isPrimary) {
  for (let i = 0; i < 2; i++) cluster.fork();
} else {
  const c = new client.Counter({ name: 'bench_events_total', help: 'Events.', labelNames: ['kind'] });
  const g = new client.Gauge({ name: 'bench_level', help: 'Levels.', labelNames: ['kind'] });
  for (let i = 0; i < 250; i++) {
    c.inc({ kind: `k${i}` }, i);
    g.set({ kind: `k${i}` }, i / 7);
  }
  http.createServer((req, res) => res.end('ok\n')).listen(Number(process.env.PORT ?? 3000));
}
