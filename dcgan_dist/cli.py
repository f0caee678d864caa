"""What every job's command line shares: `--config FILE`, `--set key=value`, logging, clean errors."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Callable

from dcgan_dist.config import Config, describe, load_config
from dcgan_dist.errors import DcganError, Stopped


def config_parser(doc: str) -> argparse.ArgumentParser:
    """A job's parser from its module docstring: the first line describes it, the rest (its examples) ends --help."""
    first, _, rest = doc.strip().partition("\n")
    p = argparse.ArgumentParser(description=first, epilog=f"examples:\n{rest.strip(chr(10))}" if rest.strip() else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = ", ".join(f"{s.name}:" for s in dataclasses.fields(Config))
    p.add_argument("--config", help=f"YAML file with config sections ({sections})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and exit")
    return p


CHAMPION = "models:/dcgan-generator@champion"


def add_model_argument(p: argparse.ArgumentParser) -> None:
    """`--model`, the one way every job that reads a registered generator names it."""
    p.add_argument("--model", default=CHAMPION,
                   help="models:/NAME@ALIAS or models:/NAME/VERSION (default: %(default)s, the best so far)")


def parse_config(args: argparse.Namespace) -> Config:
    if args.help_config:
        print(describe())
        sys.exit(0)
    cfg = load_config(args.config, args.overrides)
    # Imported once the config is read: `--help` and a mistyped key answer at once, without torch and MLflow.
    from dcgan_dist.tracking import ready_store, resolve_uri

    # Resolved here, once, relative to where the user typed it: Ray workers run in other folders.
    cfg.tracking.uri = resolve_uri(cfg.tracking.uri)
    ready_store(cfg.tracking.uri)
    return cfg


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_main(main: Callable[[], int | None]) -> None:
    """Run a job's main; our own errors become one line on stderr and their class's exit code, not a traceback."""
    setup_logging()
    try:
        sys.exit(main() or 0)
    except Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except DcganError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
