"""``python -m bench``: run the benchmarks and write BENCHMARKS.md."""

from __future__ import annotations

from bench.run import main

raise SystemExit(main())
