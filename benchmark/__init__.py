"""FlashToken's benchmark: correctness against tiktoken, speed, sweeps, multi-worker throughput.

Run it from the repository root::

    python -m benchmark --quick          # about a minute
    python -m benchmark                  # the full run, well under 30 minutes on 2 cores
    python -m benchmark.plot benchmark/out/results.json

It writes ``results.json`` (every measurement), ``summary.md`` (tables and headline ratios) and PNG
figures to ``benchmark/out``. docs/METHODOLOGY.md says what is measured and what is not.
"""
