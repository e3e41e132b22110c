#!/usr/bin/env python3
"""Walks the seed's steps 4-7 against a running controller and serving engine, printing each
request (as the curl command that does the same) and its answer.

    python scripts/seed_flow.py [--engine http://localhost:8000] [--controller http://localhost:9000]

4. a completion, 5. tokenize the prompt, 6. compress the prompt's KV (then follow the event to
COMPLETED and show it) and complete the prompt again while its KV is compressed, 7. decompress (and
follow it), then complete once more. Completions are greedy (``temperature`` 0) so that the three
answers can be compared. Exits non-zero, saying why, at the first step that fails.

Only the standard library: it runs with any python3.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import urllib.error
import urllib.request
from typing import Any

SEED_PROMPT = "Explain the significance of KV cache in language models."


class FlowError(RuntimeError):
    pass


class Flow:
    def __init__(self, engine: str, controller: str, timeout: float, quiet: bool = False) -> None:
        self.engine = engine.rstrip("/")
        self.controller = controller.rstrip("/")
        self.timeout = timeout
        self.quiet = quiet

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print(text, flush=True)

    def call(self, method: str, url: str, body: dict[str, Any] | None = None, *, show: bool = True) -> Any:
        """One HTTP call with a JSON body; prints it as curl and prints the answer."""
        data = json.dumps(body).encode() if body is not None else None
        if show:
            curl = f"curl -X {method} {url}"
            if body is not None:
                curl += f" -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}"
            self.say(f"$ {curl}")
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as err:
            raise FlowError(f"{method} {url} answered HTTP {err.code}: {err.read().decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as err:
            raise FlowError(f"{method} {url} failed: {err}") from None
        if show:
            self.say(text.strip())
        return json.loads(text) if text.strip() else None

    def wait_instance(self, instance_id: str) -> None:
        """Waits until the controller lists the engine's instance (its agent registers at start)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                infos = self.call("POST", f"{self.controller}/query_worker_info", {"instance_id": instance_id},
                                  show=False)
                if any(w.get("state", "up") == "up" for w in infos.get("worker_infos", [])):
                    return
            except FlowError:  # 404 until the agent has registered
                pass
            if time.monotonic() > deadline:
                raise FlowError(f"the controller at {self.controller} does not list instance {instance_id} "
                                f"after {self.timeout:.0f}s: is the engine running with its config?")
            time.sleep(0.2)

    def follow(self, event_id: str) -> dict[str, Any]:
        """Polls check_finish until the event ends, then prints and returns the full event."""
        url = f"{self.controller}/check_finish"
        body = {"event_id": event_id}
        self.say(f"$ curl -X POST {url} -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}"
                 "   # polled until the event ends")
        deadline = time.monotonic() + self.timeout
        last = None
        while True:
            answer = self.call("POST", url, body, show=False)
            status = answer.get("status")
            if status != last:
                self.say(json.dumps(answer))
                last = status
            if status in ("COMPLETED", "FAILED", "CANCELLED"):
                break
            if time.monotonic() > deadline:
                raise FlowError(f"event {event_id} still {status} after {self.timeout:.0f}s")
            time.sleep(0.1)
        event = self.call("GET", f"{self.controller}/events/{event_id}")["event"]
        if event.get("status") != "COMPLETED":
            raise FlowError(f"event {event_id} ended {event.get('status')}: {event.get('error')}")
        before, after = int(event.get("bytes_before", 0)), int(event.get("bytes_after", 0))
        self.say(f"# {event.get('operation')} {event.get('status')}: {event.get('chunks_done')}/"
                 f"{event.get('chunks_total')} chunks, {before} -> {after} bytes"
                 + (f" (ratio {before / after:.2f})" if after else ""))
        return event

    def complete(self, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
        return self.call("POST", f"{self.engine}/v1/completions",
                         {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def run(args: argparse.Namespace) -> dict[str, Any]:
    flow = Flow(args.engine, args.controller, args.timeout, args.quiet)
    prompt = args.prompt
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as fh:
            prompt = fh.read()
    model = args.model or flow.call("GET", f"{flow.engine}/v1/models", show=False)["data"][0]["id"]
    flow.wait_instance(args.instance_id)
    summary: dict[str, Any] = {"model": model}

    flow.say("\n## Step 4: a completion, to check that serving works")
    first = flow.complete(model, prompt, args.max_tokens)
    summary["first"] = first

    flow.say("\n## Step 5: tokenize the prompt")
    tok = flow.call("POST", f"{flow.engine}/tokenize", {"model": model, "prompt": prompt})
    tokens = tok["tokens"]
    summary["tokens"] = tokens

    op = {"instance_id": args.instance_id, "method": args.method, "location": args.location, "tokens": tokens}
    flow.say(f"\n## Step 6: compress the prompt's KV with {args.method}")
    answer = flow.call("POST", f"{flow.controller}/compress", op)
    if answer["num_tokens"] != len(tokens):
        raise FlowError(f"compress scheduled {answer['num_tokens']} tokens, expected the prompt's {len(tokens)}: "
                        "the engine did not store the prompt's chunks")
    summary["compress"] = flow.follow(answer["event_id"])
    flow.say("\n# the same prompt while its KV is compressed (decoded on the way into the model):")
    summary["while_compressed"] = flow.complete(model, prompt, args.max_tokens)

    flow.say(f"\n## Step 7: decompress it with {args.method}")
    answer = flow.call("POST", f"{flow.controller}/decompress", op)
    if answer["num_tokens"] != len(tokens):
        raise FlowError(f"decompress scheduled {answer['num_tokens']} tokens, expected {len(tokens)}")
    summary["decompress"] = flow.follow(answer["event_id"])
    flow.say("\n# and the prompt once more:")
    summary["after"] = flow.complete(model, prompt, args.max_tokens)

    texts = [summary[k]["choices"][0]["text"] for k in ("first", "while_compressed", "after")]
    cached = [summary[k]["usage"]["prompt_tokens_details"]["cached_tokens"] for k in ("while_compressed", "after")]
    flow.say("\n## Summary")
    flow.say(f"first completion:          {texts[0]!r}")
    flow.say(f"while compressed:          {texts[1]!r} ({cached[0]} prompt tokens from the cache)")
    flow.say(f"after decompress:          {texts[2]!r} ({cached[1]} prompt tokens from the cache)")
    flow.say("same text as the first:    " + ", ".join(("yes" if t == texts[0] else "no") for t in texts[1:]))
    flow.say(f"\nFollow an event live with the kvmesh client (gRPC on the controller's monitor port), e.g.:\n"
             f"  kvmesh compress --method {args.method} --tokens '{json.dumps(tokens)}' --wait")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default="http://localhost:8000", help="serving engine URL")
    p.add_argument("--controller", default="http://localhost:9000", help="controller HTTP gateway URL")
    p.add_argument("--instance-id", default="lmcache_default_instance")
    p.add_argument("--method", default="cachegen")
    p.add_argument("--location", default="LocalCPUBackend")
    p.add_argument("--model", default=None, help="model name (default: the engine's /v1/models)")
    p.add_argument("--prompt", default=SEED_PROMPT)
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file instead")
    p.add_argument("--max-tokens", type=int, default=10)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each call or event")
    p.add_argument("--json-summary", default=None, help="also write every answer to this JSON file")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        summary = run(args)
    except FlowError as err:
        print(f"seed_flow: FAILED: {err}", file=sys.stderr)
        return 1
    if args.json_summary:
        with open(args.json_summary, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
