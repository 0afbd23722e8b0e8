"""``python -m benchmarks run --suite cpu|gpu ...``: see benchmarks/suite.py and benchmarks/README.md."""

from __future__ import annotations

from benchmarks.suite import main

main()
