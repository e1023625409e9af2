"""Benchmarks that print ratios against the physical limits (SPEC section 9).

``python -m bench`` runs every row side by side and rewrites the "## Full run" section of
``BENCHMARKS.md``; ``python -m bench --quick`` is the ~2-minute version.
"""
