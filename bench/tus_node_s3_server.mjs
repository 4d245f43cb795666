// @tus/server 2.x with @tus/s3-store: the Node reference for the S3 benchmark (bench/s3_bench.py).
//
// usage: node bench/tus_node_s3_server.mjs --host 127.0.0.1 --port 1082 --bucket B \
//            --endpoint http://127.0.0.1:5000 [--region us-east-1] [--part-size 8388608]
// Credentials come from the AWS SDK's default chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
// Path-style addressing, so that any S3-compatible endpoint on an IP address works (moto, MinIO).
// Prints "tus-node listening on http://HOST:PORT/files/" once it accepts connections.
import { parseArgs } from "node:util";
import { Server } from "@tus/server";
import { S3Store } from "@tus/s3-store";

const { values } = parseArgs({
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string", default: "1082" },
    bucket: { type: "string" },
    endpoint: { type: "string" },
    region: { type: "string", default: "us-east-1" },
    "part-size": { type: "string", default: String(8 * 1024 * 1024) },
    dir: { type: "string" }, // accepted for the harness's common command line; unused
  },
});
if (!values.bucket) {
  console.error("--bucket is required");
  process.exit(2);
}

const server = new Server({
  path: "/files",
  datastore: new S3Store({
    partSize: Number(values["part-size"]),
    s3ClientConfig: {
      bucket: values.bucket,
      region: values.region,
      endpoint: values.endpoint,
      forcePathStyle: true,
    },
  }),
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
