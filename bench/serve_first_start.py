#!/usr/bin/env python3
"""How long ``kvmesh-serve`` takes to start (process launch to its "listening" line), without the
model's codec files (the first start makes them) and with them (every later start), and with
``--no-model-files``. The converted model is assumed in the cache already (the first start of all
also converts the GGUF, ~15-60 s, in every case alike). The files are made into a fresh temporary
folder (``--model-files``), so the user's cache is left as it is. Prints a markdown table.

    python bench/serve_first_start.py [--runs 1] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def time_start(args: list[str], env: dict[str, str], log: Path) -> float:
    """Seconds from launch to the "listening" line; the process is stopped right after. Its log
    (stderr: the progress lines of making the files) goes to ``log``."""
    exe = Path(sys.executable).parent / "kvmesh-serve"
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen([str(exe), "--port", "0", *args], env=env, stdout=subprocess.PIPE, stderr=err,
                                text=True)
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                if "listening on" in line:
                    return time.perf_counter() - t0
            raise RuntimeError(f"kvmesh-serve exited ({proc.wait()}): {log.read_text()[-2000:]}")
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1, help="starts with the files made (after the first)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "KVMESH_MODEL_FILES"}
        env.update({"LMCACHE_CONFIG_FILE": "", "LMCACHE_LMCACHE_WORKER_PORTS": "0", "LMCACHE_P2P_INIT_PORTS": "0",
                    "KVMESH_AUTH_TOKEN_FILE": ""})
        common = ["--threads", str(args.threads)]
        folder = ["--model-files", str(Path(tmp) / "model-files")]
        log = Path(tmp) / "engine.log"
        rows = [("no model files yet (the first start makes them)", time_start(common + folder, env, log))]
        print(log.read_text(), file=sys.stderr)
        for _ in range(args.runs):
            rows.append(("model files made (every later start)", time_start(common + folder, env, log)))
        for _ in range(args.runs):
            rows.append(("--no-model-files", time_start(common + ["--no-model-files"], env, log)))
    print("\n| kvmesh-serve start | launch -> listening (s) |\n|---|---:|")
    for what, seconds in rows:
        print(f"| {what} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
