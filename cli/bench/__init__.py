"""``flightlog bench`` in layers, each importing only the ones below it.

- :mod:`cli.bench.report`, :mod:`cli.bench.stats`, :mod:`cli.bench.profile`, :mod:`cli.bench.cpu`:
  the report model (figures, stage sections, ramps, BENCHMARKS.md), percentiles, py-spy, CPU time
  from ``/proc``. They import no other bench module.
- :mod:`cli.bench.drive`: what more than one stage drives the platform with;
  :mod:`cli.bench.charts`: the report's ramps drawn as PNG files.
- the stages, one module each (:mod:`~cli.bench.raw`, :mod:`~cli.bench.pipeline`,
  :mod:`~cli.bench.gateway`, :mod:`~cli.bench.webhooks`, :mod:`~cli.bench.imap`,
  :mod:`~cli.bench.idle`, :mod:`~cli.bench.transform_memory`), each exporting its ``STAGE``; no
  stage imports another. :mod:`cli.bench.mime` is a standalone benchmark, not a stage.
- :mod:`cli.bench.runner`: the stages' order and ``run_bench``.

This file imports nothing, so importing one layer never loads the others;
``tests/unit/test_cli_imports.py`` holds the layers to this.
"""
