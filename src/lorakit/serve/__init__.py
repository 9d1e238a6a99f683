"""Multi-adapter serving: an OpenAI-compatible HTTP server over one base model and many LoRA adapters.

    lorakit serve --model ./my-base --adapter fr=./adapters/fr --adapter-dir ./adapters

`engine` batches every request into one forward per step (continuous batching, per-row
adapters); `registry` keeps the adapters in memory (LRU); `protocol` holds the JSON shapes;
`app` holds the routes, `create_app` and the `serve` command. Importing this package does not
import FastAPI: `from lorakit.serve.app import create_app, serve` does.
"""

from .engine import Engine, Output, SamplingParams
from .registry import AdapterRegistry

__all__ = ["Engine", "Output", "SamplingParams", "AdapterRegistry"]
