// socket.io's documented multi-process setup ("Using Node.js Cluster" in socket.io's docs):
// @socket.io/sticky's setupMaster/setupWorker plus @socket.io/cluster-adapter, as the docs write
// it; only the port comes from the environment, and the connection handler (the docs' `/* ... */`)
// has three events. Under its own primary: `node socketio-sticky.js`. Under lb, unchanged:
//   lb -w 3 --serialization advanced --handoff socket.io -- node socketio-sticky.js
// lb is the primary (the first branch never runs) and does what setupMaster does, without
// reading a byte of the connection.
const cluster = require("cluster");
const http = require("http");
const { Server } = require("socket.io");
const numCPUs = require("os").cpus().length;
const { setupMaster, setupWorker } = require("@socket.io/sticky");
const { createAdapter, setupPrimary } = require("@socket.io/cluster-adapter");

if (cluster.isMaster) {
  console.log(`Master ${process.pid} is running`);

  const httpServer = http.createServer();

  // setup sticky sessions
  setupMaster(httpServer, {
    loadBalancingMethod: "least-connection",
  });

  // setup connections between the workers
  setupPrimary();

  // needed for packets containing buffers (you can ignore it if you only send plaintext objects)
  // Node.js < 16.0.0
  cluster.setupMaster({
    serialization: "advanced",
  });
  // Node.js > 16.0.0
  // cluster.setupPrimary({
  //   serialization: "advanced",
  // });

  httpServer.listen(process.env.PORT || 3000);

  for (let i = 0; i < numCPUs; i++) {
    cluster.fork();
  }

  cluster.on("exit", (worker) => {
    console.log(`Worker ${worker.process.pid} died`);
    cluster.fork();
  });
} else {
  console.log(`Worker ${process.pid} started`);

  const httpServer = http.createServer();
  const io = new Server(httpServer);

  // use the cluster adapter
  io.adapter(createAdapter());

  // setup connection with the primary process
  setupWorker(io);

  io.on("connection", (socket) => {
    socket.emit("hello", { pid: process.pid, worker: cluster.worker.id });
    socket.on("ping", (n, ack) => ack({ n, pid: process.pid }));
    socket.on("shout", (text) => io.emit("news", { text, from: process.pid }));
  });
}
