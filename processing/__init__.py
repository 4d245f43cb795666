"""Processing: checks and delivery of finished uploads and transfers (SPEC §5, §6).

    worker          the durable JetStream pull consumer and the ack decision per event
    pipeline        one attempt: open the bytes, run the steps, deliver, write the manifest
    steps/          size, sniff (+ type policy), checksum, hook
    destinations/   local folder and OneDrive (Graph upload sessions)
    ledger          lease, attempts, outcome and cleanup deadlines per job, in NATS KV
    checkpoints_kv  the CheckpointStore in NATS KV (resumable Graph sessions)
    staging         the staged bytes of an upload: open them, discard them after delivery
    sources*        ByteSources: files, S3 objects, URLs
    job, errors     what a job is; ProcessingError and its codes
    config, cli     building all of it from Settings; `run_process` for `tusgate process`

docs/processing.md describes the behaviour for operators.
"""
