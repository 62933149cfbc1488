"""`python -m buffer --run-dir D [--config-json JSON | --config FILE.yaml] [--restore-state FILE.json]`.

Starts the buffer as a standalone process: binds, writes RUN_DIR/buffer/endpoints.json and serves
until SIGTERM / SIGINT (it then commits what it holds and exits 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from archer_async.config import UserError, build_config, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m buffer", description="archer-async replay buffer server")
    p.add_argument("--run-dir", required=True, help="run directory (the buffer lives in RUN_DIR/buffer)")
    p.add_argument("--config-json", default="", help="the resolved config (full tree or buffer section) as JSON")
    p.add_argument("--config", default="", help="a YAML config file (alternative to --config-json)")
    p.add_argument("--restore-state", default="",
                   help="JSON file with the consumed_state of the learner checkpoint being resumed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s buffer %(levelname)s %(message)s")
    try:
        from buffer.server import serve
        cfg = None
        if args.config_json:
            data = json.loads(args.config_json)
            cfg = build_config(data) if "buffer" in data else data
        elif args.config:
            cfg = load_config([args.config])
        restore = None
        if args.restore_state:
            with open(args.restore_state) as f:
                restore = json.load(f)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        serve(cfg, args.run_dir, restore_state=restore,
              ready_callback=lambda ep: print(json.dumps(ep), flush=True), stop_event=stop)
    except (UserError, ValueError) as e:
        print(f"buffer: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
