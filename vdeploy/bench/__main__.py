"""``python -m vdeploy.bench``: the benchmark (``--help`` lists the options)."""

from vdeploy.bench import main

raise SystemExit(main(prog="python -m vdeploy.bench"))
