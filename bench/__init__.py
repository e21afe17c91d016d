"""hhrm's benchmark scripts: ``python -m bench`` (see ``bench/__main__.py`` and ``bench/README.md``)."""

import os

# Set before any section imports tokenizers (the bench tokenizes in the main process only).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
