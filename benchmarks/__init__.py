"""Benchmarks of lorakit against the cost floor and against PEFT (an oracle only, as in the tests).

    python -m benchmarks.run [--quick]      every row, the table, and docs/benchmarks.md

Modules: `common` (the model, timing and process-memory measurement all rows share),
`lora_step` (training steps), `inference` (merged and unmerged forward), `adapter_load`
(loading an adapter onto a running model), `run` (the table and the report).
"""
