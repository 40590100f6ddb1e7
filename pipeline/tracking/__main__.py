"""``python -m pipeline.tracking replay ...`` (see pipeline.tracking.cli)."""
import sys

from pipeline.tracking.cli import main

if __name__ == "__main__":
    sys.exit(main())
