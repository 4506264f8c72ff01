// The `sticky-session` package's README example, unchanged but for the port (from the
// environment) and the response naming the worker's pid. Under its own primary:
// `node sticky-session.js`. Under lb: `lb -w 2 --handoff sticky:balance -- node sticky-session.js`.
var cluster = require('cluster'); // Only required if you want the worker id
var sticky = require('sticky-session');

var server = require('http').createServer(function(req, res) {
  res.end('worker: ' + cluster.worker.id + ' pid ' + process.pid);
});

if (!sticky.listen(server, Number(process.env.PORT || 3000))) {
  // Master code
  server.once('listening', function() {
    console.log('server started on 3000 port');
  });
} else {
  // Worker code
}
