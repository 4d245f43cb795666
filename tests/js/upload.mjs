// Upload one file with tus-js-client (the real Node client) and print the result as JSON.
//
// usage: node tests/js/upload.mjs ENDPOINT FILE CHUNK_SIZE PARALLEL_UPLOADS [--metadata k=v ...]
//   CHUNK_SIZE        bytes per PATCH ("Infinity" for one PATCH per upload)
//   PARALLEL_UPLOADS  1 for a plain upload; >1 splits the file into partial uploads and
//                     joins them with a final upload (the concatenation extension)
// stdout: {"url": "<final upload URL>", "size": N, "elapsed_s": T, "retries": 0}
// Exits non-zero with the error on stderr when the upload fails. No retries by default, so a
// server error is reported instead of being hidden by a retry (--retries N to allow some).
import { createReadStream, statSync } from "node:fs";
import { basename } from "node:path";
import { parseArgs } from "node:util";
import * as tus from "tus-js-client";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    metadata: { type: "string", multiple: true, default: [] },
    retries: { type: "string", default: "0" },
  },
});
if (positionals.length !== 4) {
  console.error("usage: upload.mjs ENDPOINT FILE CHUNK_SIZE PARALLEL_UPLOADS [--metadata k=v]");
  process.exit(2);
}
const [endpoint, filePath, chunkArg, parallelArg] = positionals;
const chunkSize = chunkArg === "Infinity" ? Infinity : Number(chunkArg);
const parallelUploads = Number(parallelArg);
const metadata = { filename: basename(filePath) };
for (const pair of values.metadata) {
  const eq = pair.indexOf("=");
  metadata[eq < 0 ? pair : pair.slice(0, eq)] = eq < 0 ? "" : pair.slice(eq + 1);
}

const size = statSync(filePath).size;
const started = process.hrtime.bigint();
let retries = 0;

let result;
try {
  result = await new Promise((resolve, reject) => {
    const upload = new tus.Upload(createReadStream(filePath), {
      endpoint,
      chunkSize,
      parallelUploads,
      metadata,
      retryDelays: Array.from({ length: Number(values.retries) }, () => 200),
      onShouldRetry: (err, attempt) => {
        retries += 1;
        console.error(`retry ${attempt + 1} after: ${err.message}`);
        return true;
      },
      onError: reject,
      onSuccess: () => resolve(upload.url),
    });
    upload.start();
  });
} catch (err) {
  // DetailedError's message already names the request, the status and the response body;
  // the default dump of the error object is thousands of lines of socket internals.
  console.error(`upload failed: ${err.message}`);
  process.exit(1);
}

const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
console.log(JSON.stringify({ url: result, size, elapsed_s: elapsed, retries }));
