// Upload one file with tus-js-client (the real Node client) and print the result as JSON.
//
// usage: node tests/js/upload.mjs ENDPOINT FILE CHUNK_SIZE PARALLEL_UPLOADS [options]
//   CHUNK_SIZE        bytes per PATCH ("Infinity" for one PATCH per upload)
//   PARALLEL_UPLOADS  1 for a plain upload; >1 splits the file into partial uploads and
//                     joins them with a final upload (the concatenation extension)
// options:
//   --metadata k=v            Upload-Metadata entries (repeatable); filename is always sent
//   --data-during-creation    send the first chunk with the POST (creation-with-upload)
//   --defer-length            read the file as a plain stream of unknown length
//                             (creation-defer-length: Upload-Defer-Length, length sent at the end)
//   --url-storage PATH        remember the upload URL in a FileUrlStorage at PATH and resume a
//                             previous upload of the same file found there (findPreviousUploads)
//   --stop-after N            abort the upload once N bytes are acknowledged (the URL stays in
//                             the storage, the server keeps the upload)
//   --terminate-after N       abort(true) once N bytes are acknowledged: the client DELETEs it
//   --retries N               retry failed requests N times (default 0: errors are reported)
//   --protocol P              tus-v1 (default), ietf-draft-03 or ietf-draft-05
// stdout: {"url", "size", "elapsed_s", "retries", "resumed_from", "sent", "ended"}
//   resumed_from  offset of a previous upload this run continued (null: started afresh)
//   sent          bytes acknowledged by the server when the run ended
//   ended         "success", "stopped" or "terminated"
// Exits non-zero with the error on stderr when the upload fails.
import { createReadStream, statSync } from "node:fs";
import { basename } from "node:path";
import { PassThrough } from "node:stream";
import { parseArgs } from "node:util";
import * as tus from "tus-js-client";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    metadata: { type: "string", multiple: true, default: [] },
    "data-during-creation": { type: "boolean", default: false },
    "defer-length": { type: "boolean", default: false },
    "url-storage": { type: "string" },
    "stop-after": { type: "string" },
    "terminate-after": { type: "string" },
    retries: { type: "string", default: "0" },
    protocol: { type: "string", default: "tus-v1" },
  },
});
if (positionals.length !== 4) {
  console.error("usage: upload.mjs ENDPOINT FILE CHUNK_SIZE PARALLEL_UPLOADS [options]");
  process.exit(2);
}
const [endpoint, filePath, chunkArg, parallelArg] = positionals;
const chunkSize = chunkArg === "Infinity" ? Infinity : Number(chunkArg);
const parallelUploads = Number(parallelArg);
const stopAfter = values["stop-after"] === undefined ? null : Number(values["stop-after"]);
const terminateAfter =
  values["terminate-after"] === undefined ? null : Number(values["terminate-after"]);
const metadata = { filename: basename(filePath) };
for (const pair of values.metadata) {
  const eq = pair.indexOf("=");
  metadata[eq < 0 ? pair : pair.slice(0, eq)] = eq < 0 ? "" : pair.slice(eq + 1);
}

function source() {
  if (!values["defer-length"]) return createReadStream(filePath); // a file: random access
  const stream = new PassThrough(); // a stream with no path: its length is unknown up front
  createReadStream(filePath).pipe(stream);
  return stream;
}

const size = statSync(filePath).size;
const started = process.hrtime.bigint();
let retries = 0;
let resumedFrom = null;
let sent = 0;

async function run() {
  return new Promise((resolve, reject) => {
    const options = {
      endpoint,
      chunkSize,
      parallelUploads,
      metadata,
      uploadDataDuringCreation: values["data-during-creation"],
      uploadLengthDeferred: values["defer-length"],
      protocol: values.protocol,
      retryDelays: Array.from({ length: Number(values.retries) }, () => 200),
      onShouldRetry: (err, attempt) => {
        retries += 1;
        console.error(`retry ${attempt + 1} after: ${err.message}`);
        return true;
      },
      onError: reject,
      onSuccess: () => resolve({ ended: "success", url: upload.url }),
      // When resuming, the first progress event reports the offset the server gave (HEAD).
      onProgress: (bytes) => {
        if (resuming && resumedFrom === null) resumedFrom = bytes;
      },
      onChunkComplete: (_chunk, accepted) => {
        sent = accepted;
        if (stopAfter !== null && accepted >= stopAfter) {
          const url = upload.url;
          upload.abort(false).then(() => resolve({ ended: "stopped", url }), reject);
        } else if (terminateAfter !== null && accepted >= terminateAfter) {
          const url = upload.url;
          upload.abort(true).then(() => resolve({ ended: "terminated", url }), reject);
        }
      },
    };
    if (values["url-storage"]) {
      options.urlStorage = new tus.FileUrlStorage(values["url-storage"]);
      options.storeFingerprintForResuming = true;
      options.removeFingerprintOnSuccess = false;
    }
    let resuming = false;
    const upload = new tus.Upload(source(), options);
    upload.findPreviousUploads().then((previous) => {
      if (values["url-storage"] && previous.length > 0) {
        resuming = true;
        upload.resumeFromPreviousUpload(previous[0]);
      }
      upload.start();
    }, reject);
  });
}

let outcome;
try {
  outcome = await run();
} catch (err) {
  // DetailedError's message already names the request, the status and the response body;
  // the default dump of the error object is thousands of lines of socket internals.
  console.error(`upload failed: ${err.message}`);
  process.exit(1);
}

const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
const { url, ended } = outcome;
const result = { url, size, elapsed_s: elapsed, retries, resumed_from: resumedFrom, sent, ended };
console.log(JSON.stringify(result));
