"""``python -m pipeline.tracking replay <spool> [--tracking-uri URI] [--max-records N]``: sends a spool a
tracker left (the server was down until the end) into its MLflow run."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.config import TrackingConfig
from pipeline.tracking.common import set_http_env
from pipeline.tracking.spool import replay_spool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking",
                                     description="MLflow tracking tools of relalign.")
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser("replay", help="send a spool (<run_dir>/mlflow_spool.jsonl) into its MLflow run")
    replay.add_argument("spool", type=Path)
    replay.add_argument("--tracking-uri", help="where to send it (default: the URI the run used)")
    replay.add_argument("--max-records", type=int, default=None,
                        help="stop after this many records; a later replay continues from there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_http_env(TrackingConfig())
    if not args.spool.is_file():
        print(f"replay: no spool at {args.spool}", file=sys.stderr)
        return 2
    try:
        result = replay_spool(args.spool, args.tracking_uri, args.max_records)
    except Exception as exc:  # noqa: BLE001 - one line; the state file lets the next replay continue
        print(f"replay: stopped ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); "
              f"run it again to continue", file=sys.stderr)
        return 1
    status = f"status {result['status']}" if result["status"] else "no final status in this part"
    rest = "the spool is removed" if result["complete"] else f"the rest stays in {args.spool}"
    print(f"replayed {result['metrics']} metric values into run {result['run_id']} ({status}); {rest}")
    return 0
