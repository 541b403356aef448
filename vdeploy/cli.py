"""The ``vdeploy`` command line: the one file that sees every stage.

Each command imports its stage inside its body, so ``vdeploy sample`` never loads torch.
Bad input (a missing file, a config that does not fit) is a one-line message and exit code 2.
"""

from __future__ import annotations

import click


class BadInput(click.ClickException):
    """A user error: printed as one line ``Error: ...``, exit code 2, no traceback."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="vdeploy")
def main() -> None:
    """vdeploy: train a video-diffusion U-Net, export it to ONNX/TensorRT, sample it without torch.

    \b
    Typical flow:
      vdeploy data synth data/               # a synthetic GIF dataset with captions
      vdeploy train --data data/ --results results/ --config tiny
      vdeploy export --ckpt results/model-last.pt --out model/
      vdeploy sample --model model/ --out sample.gif
      vdeploy parity --model model/ --ckpt results/model-last.pt
    """


# ---------------------------------------------------------------- data ----


# --------------------------------------------------------------- train ----


# -------------------------------------------------------------- export ----


# -------------------------------------------------------------- sample ----


# -------------------------------------------------------------- parity ----


# --------------------------------------------------------------- bench ----


if __name__ == "__main__":
    main()
