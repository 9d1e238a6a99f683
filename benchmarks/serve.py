"""Serving throughput: the real `lorakit serve`, 1 / 16 / 64 concurrent requests over mixed adapters.

Usage: python -m benchmarks.serve [--quick] [--threads N] [--repeats N] [--markdown] [--write-docs]

Builds a Llama-style model from a config (no download) and four r=8 adapters on q_proj/v_proj,
saves them, and starts `python -m lorakit.cli serve` on them in a subprocess on 127.0.0.1
(--max-batch-size 64, its torch limited to --threads threads). Every request goes through the
official `openai` client (AsyncOpenAI, streaming, greedy, token-id prompts of the same length,
a fixed number of new tokens: the model has no end-of-sequence token), adapters taken in turn.

Per round, in this order: the same base model's `generate` on a batch of 16 (the same prompts,
greedy) in this process with the same number of torch threads; 16 requests at once; the same 16
one after another; one request; 64 at once. Aggregate tokens/s = generated tokens / wall time
from the first request sent to the last token received (HTTP, SSE and detokenizing included);
time to first token and latency are per request, pooled over the rounds. The table gives each
row's median tokens/s over rounds and its range (the machine is shared: the range is the noise),
and how many prefill forwards the server ran per round (from its /metrics: 1 for a burst means
the burst's prompts were prefilled together).

Goals it prints, each as the median over rounds of that round's ratio (paired: a slow round for
the machine slows both sides): 16 concurrent >= 4x the tokens/s of the same 16 one after
another, and >= 0.7x the batched `generate`. `--write-docs` puts the table and goals into
docs/benchmarks.md in its own section (the rest of the file is left alone). The server's stderr
goes to a temporary file whose tail is printed if the server dies.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import common
from .common import ModelSpec

MODULE = "benchmarks.serve"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SECTION_START, SECTION_END = "<!-- benchmarks.serve: start -->", "<!-- benchmarks.serve: end -->"
LOG_TAIL = 4000  # characters of the server's stderr printed when it dies
FULL = ModelSpec(layers=4, hidden=512, intermediate=1376, heads=8, vocab=8192, batch=16, seq=32)
QUICK = ModelSpec(layers=2, hidden=256, intermediate=688, heads=4, vocab=4096, batch=16, seq=16)
ADAPTERS = [f"a{i}" for i in range(4)]
RANK = 8
MAX_BATCH = 64
SPEEDUP_GOAL, VS_GENERATE_GOAL = 4.0, 0.7


@dataclasses.dataclass(frozen=True)
class Timing:
    """One request: seconds to its first streamed token and to its end, and tokens generated."""

    ttft: float
    latency: float
    tokens: int


@dataclasses.dataclass
class Level:
    """One row: every round's aggregate tokens/s and every request's timing."""

    name: str
    requests: int
    tokens_per_s: list[float] = dataclasses.field(default_factory=list)
    timings: list[Timing] = dataclasses.field(default_factory=list)
    prefills: list[int] = dataclasses.field(default_factory=list)  # the server's prefill forwards, per round


# --- the files the server reads -----------------------------------------------------------------------

def write_model(root: Path, spec: ModelSpec) -> tuple[Path, dict[str, Path]]:
    """The base model with a word-level tokenizer ("w0".."w{vocab-1}", no end-of-sequence token)
    and the adapters, saved under `root`; returns the model folder and {adapter: folder}."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    import lorakit

    def base():
        model = common.build_llama(spec).eval()
        model.config.eos_token_id = model.config.bos_token_id = None
        model.generation_config.eos_token_id = model.generation_config.bos_token_id = None
        return model

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(spec.vocab)}, unk_token="w0"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0")
    model_dir = root / "base"
    base().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    adapters = {}
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(100 + i)
        peft_model = lorakit.get_peft_model(base(), lorakit.LoraConfig(
            r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peft_model.save_pretrained(root / name)
        adapters[name] = root / name
    return model_dir, adapters


# --- the server ----------------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(log: Path) -> str:
    """The last LOG_TAIL characters of the server's stderr file (empty when it cannot be read)."""
    try:
        return log.read_text(errors="replace")[-LOG_TAIL:]
    except OSError:
        return ""


def start_server(model_dir: Path, adapters: dict[str, Path], threads: int, max_tokens: int,
                 log: Path) -> tuple[subprocess.Popen, str]:
    """`lorakit serve` in a subprocess, its stderr into the file `log`; returns it and its base
    URL once /health answers.

    Raises:
        RuntimeError: the server exited (the message ends with its stderr's tail) or did not
            answer within 120 s.
    """
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "lorakit.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--served-model-name", "base", "--adapter", ",".join(f"{n}={p}" for n, p in adapters.items()),
               "--max-batch-size", str(MAX_BATCH), "--max-tokens-limit", str(max_tokens), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}: {' '.join(command)}\n"
                               f"its stderr ends:\n{log_tail(log)}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise RuntimeError(f"the server did not answer /health within 120 s; its stderr ends:\n{log_tail(log)}")


async def one_request(client, model: str, prompt: list[int], max_tokens: int) -> Timing:
    """A streamed greedy completion; its time to the first token, its latency and its token count."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return Timing(ttft=(first or end) - start, latency=end - start, tokens=tokens)


def prefill_forwards(url: str) -> int:
    """The server's prefill forwards so far (`lorakit_prefill_batch_size_count` on /metrics)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return next(int(sample.value) for family in text_string_to_metric_families(text) for sample in family.samples
                if sample.name == "lorakit_prefill_batch_size_count")


async def fire(client, prompts: list[list[int]], max_tokens: int, concurrent: bool) -> tuple[float, list[Timing]]:
    """All `prompts` (adapters in turn), at once or one after another; (aggregate tokens/s, timings)."""
    models = [ADAPTERS[i % len(ADAPTERS)] for i in range(len(prompts))]
    start = time.perf_counter()
    if concurrent:
        timings = await asyncio.gather(*(one_request(client, m, p, max_tokens) for m, p in zip(models, prompts)))
    else:
        timings = [await one_request(client, m, p, max_tokens) for m, p in zip(models, prompts)]
    wall = time.perf_counter() - start
    return sum(t.tokens for t in timings) / wall, list(timings)


# --- the reference: batched generate -------------------------------------------------------------------

def generate_tokens_per_s(model, prompts: list[list[int]], max_tokens: int) -> float:
    """The base model's greedy `generate` on all `prompts` as one batch: generated tokens / second."""
    ids = torch.tensor(prompts)  # (16, P), all the same length: no padding
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    wall = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / wall


# --- the run -----------------------------------------------------------------------------------------------

def run(spec: ModelSpec, threads: int, repeats: int, max_tokens: int, log=print) -> dict[str, Level]:
    """Every row's measurements (see the module docstring)."""
    import openai

    from lorakit.hub import load_model_and_tokenizer

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, spec.vocab, (spec.seq,), generator=g).tolist() for _ in range(MAX_BATCH)]
    levels = {name: Level(name, n) for name, n in
              [("generate, base, batch 16", 16), ("16 concurrent", 16), ("16 one after another", 16),
               ("1 request", 1), ("64 concurrent", 64)]}
    with tempfile.TemporaryDirectory() as tmp:
        log(f"[serve] writing the model and {len(ADAPTERS)} adapters ...")
        model_dir, adapters = write_model(Path(tmp), spec)
        reference, _ = load_model_and_tokenizer(str(model_dir))
        torch.set_num_threads(threads)
        server_log = Path(tmp) / "server.stderr"
        process, url = start_server(model_dir, adapters, threads, max_tokens, server_log)
        try:
            async def rounds() -> None:
                client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
                await fire(client, prompts[:4], max_tokens, concurrent=True)  # warm-up
                generate_tokens_per_s(reference, prompts[:16], 4)
                for r in range(repeats):
                    log(f"[serve] round {r + 1}/{repeats} ...")
                    levels["generate, base, batch 16"].tokens_per_s.append(
                        generate_tokens_per_s(reference, prompts[:16], max_tokens))
                    for name, subset, concurrent in [("16 concurrent", prompts[:16], True),
                                                     ("16 one after another", prompts[:16], False),
                                                     ("1 request", prompts[:1], False),
                                                     ("64 concurrent", prompts[:64], True)]:
                        before = prefill_forwards(url)
                        tps, timings = await fire(client, subset, max_tokens, concurrent)
                        levels[name].tokens_per_s.append(tps)
                        levels[name].timings += timings
                        levels[name].prefills.append(prefill_forwards(url) - before)
                await client.close()

            try:
                asyncio.run(rounds())
            except Exception:
                if process.poll() is not None:  # the server died under the load: say why
                    print(f"[serve] the server exited with status {process.returncode}; its stderr ends:\n"
                          f"{log_tail(server_log)}", file=sys.stderr)
                raise
        finally:
            process.terminate()
            process.wait(30)
    return levels


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def span(values: list[int]) -> str:
    """"3" when all are 3, else "min-max"."""
    return str(min(values)) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def table(levels: dict[str, Level]) -> str:
    lines = ["| load | requests | tokens/s (median, range over rounds) | time to first token p50 | latency p50 "
             "| latency p99 | prefill forwards per round |",
             "|---|---|---|---|---|---|---|"]
    for level in levels.values():
        tps = level.tokens_per_s
        cells = [level.name, str(level.requests), f"{statistics.median(tps):.0f} ({min(tps):.0f}-{max(tps):.0f})"]
        if level.timings:
            latencies = [t.latency for t in level.timings]
            cells += [ms(percentile([t.ttft for t in level.timings], 50)), ms(percentile(latencies, 50)),
                      ms(percentile(latencies, 99)), span(level.prefills)]
        else:
            cells += ["", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(levels: dict[str, Level]) -> list[str]:
    """The two goals: each the median of per-round ratios (with their range) and whether it is met."""
    lines = []
    for name, other, goal in [("16 concurrent / 16 one after another", "16 one after another", SPEEDUP_GOAL),
                              ("16 concurrent / batched generate", "generate, base, batch 16", VS_GENERATE_GOAL)]:
        ratios = [a / b for a, b in zip(levels["16 concurrent"].tokens_per_s, levels[other].tokens_per_s)]
        ratio = statistics.median(ratios)
        lines.append(f"{name}: {ratio:.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}x; goal >= {goal}x: "
                     f"{'met' if ratio >= goal else 'NOT met'})")
    return lines


def section(levels: dict[str, Level], spec: ModelSpec, repeats: int, max_tokens: int, threads: int,
            command: str) -> str:
    """The docs/benchmarks.md section, between its markers."""
    machine = common.machine()
    return "\n".join([
        SECTION_START,
        "## Serving throughput (`python -m benchmarks.serve`)",
        "",
        f"Generated by `{command}`; {machine['cpu']}, {machine['cores']} cores (shared with other jobs), "
        f"torch {machine['torch']}, transformers {machine['transformers']}, lorakit {machine['lorakit commit']}, "
        f"{threads} torch thread(s).",
        "",
        f"- Model: {spec.describe().split(';')[0]} (random, no end-of-sequence token); {len(ADAPTERS)} adapters "
        f"r={RANK} on q_proj/v_proj, requests take them in turn; prompts of {spec.seq} tokens, {max_tokens} new "
        f"tokens each, greedy, streamed through AsyncOpenAI to `lorakit serve --max-batch-size {MAX_BATCH}` in a "
        f"subprocess (its other settings at their defaults); {repeats} rounds. The machine is shared: the ranges over rounds are the noise.",
        "",
        table(levels),
        "",
        "\n".join(f"- {line}." for line in goals(levels)),
        SECTION_END,
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model, fewer tokens, one round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for the server and generate")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 3; --quick 1)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 32; --quick 8)")
    parser.add_argument("--markdown", action="store_true", help="also print the docs/benchmarks.md section")
    parser.add_argument("--write-docs", action="store_true", help="put the section into docs/benchmarks.md")
    args = parser.parse_args(argv)
    spec = QUICK if args.quick else FULL
    repeats = args.repeats or (1 if args.quick else 3)
    max_tokens = args.max_tokens or (8 if args.quick else 32)
    levels = run(spec, args.threads, repeats, max_tokens)
    print(table(levels))
    for line in goals(levels):
        print(line)
    command = f"python -m {MODULE}" + (" --quick" if args.quick else "") + (
        f" --repeats {args.repeats}" if args.repeats else "") + (
        f" --max-tokens {args.max_tokens}" if args.max_tokens else "") + (
        f" --threads {args.threads}" if args.threads != 1 else "")
    text = section(levels, spec, repeats, max_tokens, args.threads, command)
    if args.markdown:
        print("\n" + text)
    if args.write_docs:
        common.write_section(DOCS, SECTION_START, SECTION_END, text)
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
