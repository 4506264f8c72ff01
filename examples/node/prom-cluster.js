// prom-client's cluster example (example/cluster.js in prom-client's repository), written with
// node:http instead of express: one file, `new AggregatorRegistry()` at the top; the primary forks
// the workers and serves the aggregated metrics on METRICS_PORT (3001); each worker counts its
// requests, times them in a histogram, keeps an `aggregator: 'max'` gauge and the default
// metrics. Under `lb -- node prom-cluster.js` the primary branch never runs: lb asks the workers
// and serves the same aggregation on its own /metrics.
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');
const client = require('prom-client');

const aggregatorRegistry = new client.AggregatorRegistry();

if (cluster.isPrimary) {
  for (let i = 0; i < 3; i++) cluster.fork();
  http
    .createServer(async (req, res) => {
      try {
        const metrics = await aggregatorRegistry.clusterMetrics();
        res.setHeader('Content-Type', aggregatorRegistry.contentType);
        res.end(metrics);
      } catch (ex) {
        res.statusCode = 500;
        res.end(ex.message);
      }
    })
    .listen(Number(process.env.METRICS_PORT ?? 3001));
} else {
  client.collectDefaultMetrics();
  const requests = new client.Counter({
    name: 'app_requests_total',
    help: 'Requests served.',
    labelNames: ['route'],
  });
  const duration = new client.Histogram({
    name: 'app_request_duration_seconds',
    help: 'Time to answer a request.',
    buckets: [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1],
  });
  const busiest = new client.Gauge({
    name: 'app_in_flight_max',
    help: 'Requests in flight, on the busiest worker.',
    aggregator: 'max',
  });
  http
    .createServer((req, res) => {
      const end = duration.startTimer();
      busiest.inc();
      res.end(`worker ${cluster.worker.id} pid ${process.pid}\n`);
      requests.inc({ route: '/' });
      busiest.dec();
      end();
    })
    .listen(Number(process.env.PORT ?? 3000));
}
