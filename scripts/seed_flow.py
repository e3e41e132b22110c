#!/usr/bin/env python3
"""The quick start's walk through kvmesh, against a running controller and serving engine, printing
each request (as the curl command that does the same) and its answer.

    python scripts/seed_flow.py [--engine http://localhost:8000] [--controller http://localhost:9000]

1. a completion, 2. the prompt's tokens, 3. compress the prompt's KV cache (following the event until
it completes) and complete the prompt again while its KV cache is compressed, 4. decompress it (and
follow that), then complete once more. Completions are greedy (``temperature`` 0) so that the three
answers can be compared. Exits non-zero, saying why, at the first step that fails.

With ``KVMESH_AUTH_TOKEN_FILE`` set (or ``--token-file``), every request carries
``Authorization: Bearer <token>``. Only the standard library: it runs with any python3.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
from typing import Any

SEED_PROMPT = "Explain the significance of KV cache in language models."


class FlowError(RuntimeError):
    pass


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``: byte counts as people read them."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def read_token(path: str | None) -> str | None:
    """The bearer token in ``path`` (None without a path); a missing or empty file is a FlowError."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as err:
        raise FlowError(f"cannot read the token file {path}: {err.strerror or err}") from None
    if not token:
        raise FlowError(f"the token file {path} is empty")
    return token


def _shown_path(path: str | None) -> str:
    """``path`` relative to the working directory when it lies below it (shorter commands to copy)."""
    if not path:
        return ""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def describe(event: dict[str, Any]) -> str:
    """One line for an ended event: what it did to how many bytes; "N x smaller" only for a compress.

    The HTTP gateway writes 64-bit counts as JSON strings (protobuf's JSON mapping): int() them."""
    op, status = event.get("operation", "?"), event.get("status", "?")
    before, after = int(event.get("bytes_before") or 0), int(event.get("bytes_after") or 0)
    line = f"{op} {status}: {event.get('chunks_done')}/{event.get('chunks_total')} chunks, "
    line += f"{human_bytes(before)} -> {human_bytes(after)}"
    if op == "COMPRESS" and after:
        line += f", {before / after:.1f}x smaller"
    elif op == "DECOMPRESS":
        line += ", back to full size"
    return line


class Flow:
    def __init__(self, engine: str, controller: str, timeout: float, quiet: bool = False,
                 token_file: str | None = None) -> None:
        self.engine = engine.rstrip("/")
        self.controller = controller.rstrip("/")
        self.timeout = timeout
        self.quiet = quiet
        self.token = read_token(token_file)
        # As the printed curl commands say it: the file, not the secret.
        self.auth_curl = (f' -H "Authorization: Bearer $(cat {shlex.quote(_shown_path(token_file))})"'
                          if token_file else "")
        self.headers = {"Content-Type": "application/json"}
        if self.token:
            self.headers["Authorization"] = f"Bearer {self.token}"

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print(text, flush=True)

    def call(self, method: str, url: str, body: dict[str, Any] | None = None, *, show: bool = True) -> Any:
        """One HTTP call with a JSON body; prints it as curl and prints the answer."""
        data = json.dumps(body).encode() if body is not None else None
        if show:
            curl = f"curl -X {method} {url}{self.auth_curl}"
            if body is not None:
                curl += f" -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}"
            self.say(f"$ {curl}")
        req = urllib.request.Request(url, data=data, method=method, headers=self.headers)
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
        self.say(f"$ curl -X POST {url}{self.auth_curl} -H 'Content-Type: application/json' "
                 f"-d {shlex.quote(json.dumps(body))}   # asked again until the event ends")
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
        self.say("# " + describe(event))
        return event

    def complete(self, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
        return self.call("POST", f"{self.engine}/v1/completions",
                         {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})


def run(args: argparse.Namespace) -> dict[str, Any]:
    flow = Flow(args.engine, args.controller, args.timeout, args.quiet, args.token_file)
    prompt = args.prompt
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as fh:
            prompt = fh.read()
    model = args.model or flow.call("GET", f"{flow.engine}/v1/models", show=False)["data"][0]["id"]
    flow.wait_instance(args.instance_id)
    summary: dict[str, Any] = {"model": model}

    flow.say("\n## 1. A completion, to check that serving works")
    first = flow.complete(model, prompt, args.max_tokens)
    summary["first"] = first

    flow.say("\n## 2. The prompt's tokens")
    tok = flow.call("POST", f"{flow.engine}/tokenize", {"model": model, "prompt": prompt})
    tokens = tok["tokens"]
    summary["tokens"] = tokens

    op = {"instance_id": args.instance_id, "method": args.method, "location": args.location, "tokens": tokens}
    flow.say(f"\n## 3. Compress the prompt's KV cache ({args.method}, in the engine's {args.location})")
    answer = flow.call("POST", f"{flow.controller}/compress", op)
    if answer["num_tokens"] != len(tokens):
        raise FlowError(f"compress scheduled {answer['num_tokens']} tokens, expected the prompt's {len(tokens)}: "
                        "the engine did not store the prompt's KV cache")
    summary["compress"] = flow.follow(answer["event_id"])
    flow.say("\n# the same prompt while its KV cache is compressed (decoded on the way into the model):")
    summary["while_compressed"] = flow.complete(model, prompt, args.max_tokens)

    flow.say("\n## 4. Decompress it")
    answer = flow.call("POST", f"{flow.controller}/decompress", op)
    if answer["num_tokens"] != len(tokens):
        raise FlowError(f"decompress scheduled {answer['num_tokens']} tokens, expected {len(tokens)}")
    summary["decompress"] = flow.follow(answer["event_id"])
    flow.say("\n# and the prompt once more:")
    summary["after"] = flow.complete(model, prompt, args.max_tokens)

    texts = [summary[k]["choices"][0]["text"] for k in ("first", "while_compressed", "after")]
    cached = [summary[k]["usage"]["prompt_tokens_details"]["cached_tokens"] for k in ("while_compressed", "after")]
    flow.say("\n## Summary")
    flow.say(f"first completion:   {texts[0]!r}")
    flow.say(f"while compressed:   {texts[1]!r} ({cached[0]} of {len(tokens)} prompt tokens from the compressed cache)")
    flow.say(f"after decompress:   {texts[2]!r} ({cached[1]} of {len(tokens)} prompt tokens from the cache)")
    flow.say(f"compress:           {describe(summary['compress'])}")
    flow.say(f"decompress:         {describe(summary['decompress'])}")
    same = all(t == texts[0] for t in texts[1:])
    flow.say("same text all three times: " + ("yes" if same else "NO (the compressed cache changed the answer)"))
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
    p.add_argument("--token-file", default=os.environ.get("KVMESH_AUTH_TOKEN_FILE") or None,
                   help="send the bearer token in this file (default: $KVMESH_AUTH_TOKEN_FILE)")
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
