// A plain @tus/server 2.x with @tus/file-store: the Node reference the gateway is compared with.
//
// usage: node bench/tus_node_server.mjs --host 127.0.0.1 --port 1081 --dir /tmp/tus-node-data
// Prints "tus-node listening on http://HOST:PORT/files/" once it accepts connections.
import { mkdirSync } from "node:fs";
import { parseArgs } from "node:util";
import { Server } from "@tus/server";
import { FileStore } from "@tus/file-store";

const { values } = parseArgs({
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string", default: "1081" },
    dir: { type: "string", default: "./tus-node-data" },
  },
});

mkdirSync(values.dir, { recursive: true });
const server = new Server({
  path: "/files",
  datastore: new FileStore({ directory: values.dir }),
});

const httpServer = server.listen({ host: values.host, port: Number(values.port) }, () => {
  const { address, port } = httpServer.address();
  console.log(`tus-node listening on http://${address}:${port}/files/`);
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    httpServer.close(() => process.exit(0));
    // Open keep-alive sockets would hold close() forever.
    httpServer.closeAllConnections?.();
    setTimeout(() => process.exit(0), 2000).unref();
  });
}
