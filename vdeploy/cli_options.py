"""The ``vdeploy`` click group and the option types every command module shares; the command modules
(``cli.py``: data, train; ``cli_model.py``: export, verify, parity, bench; ``cli_runtime.py``: sample, serve)
import this one and register on ``main``. It imports none of them, so there is no circle.

The choice lists come from the tables, read when a command parses (so an entry added to a table is a choice):
``--backend`` from ``BACKENDS``, ``--precision`` from the backends' ``precisions``, ``--sampler`` from
``SAMPLERS`` and one flag per ``SamplerOption`` of the samplers table (``sampler_option_flags``).
"""

from __future__ import annotations

import math

import click


class BadInput(click.ClickException):
    """A user error: printed as one line ``Error: ...``, exit code 2, no traceback."""

    exit_code = 2


def require_extra(command: str, *modules: str) -> None:
    """Refuse, in one line naming the extra to install, a torch-side command on a runtime-only install.

    Looks the modules up without importing them, so it costs nothing where they are installed.
    """
    import importlib.util

    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: sys.modules[name] is None (import blocked)
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise BadInput(f"vdeploy {command} needs {', '.join(missing)}, which this install lacks (the runtime-only "
                       "install samples without torch): pip install 'vdeploy[train,export]'")


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


class OneLineErrors(click.Command):
    """A command whose usage errors (missing or malformed options) are one line and exit code 2."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise BadInput(f"{e.format_message()} (see '{ctx.command_path} --help')") from None


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that refuses nan and inf too (FloatRange lets nan through any bound)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            bounds = f" (expected {self._describe_range()})" if self._describe_range() else ""
            self.fail(f"{value!r} is not a finite number{bounds}", param, ctx)
        return rv

    def _describe_range(self) -> str:  # click shows it in --help; unbounded: nothing (not "x<=None")
        return super()._describe_range() if self.min is not None or self.max is not None else ""


class TableChoice(click.Choice):
    """``click.Choice`` whose choices are read from a table when used (``choices()`` a callable), so a table
    entry added after import is a choice too."""

    def __init__(self, choices):
        self._choices = choices
        super().__init__([])

    @property
    def choices(self):
        return list(self._choices())

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ sets it; the table stays the source
        pass


def backend_choice(auto: bool = True) -> TableChoice:
    """``--backend``'s choices: ``auto`` and every entry of ``BACKENDS``."""
    from vdeploy.runtime.backends import BACKENDS

    return TableChoice(lambda: (["auto"] if auto else []) + list(BACKENDS))


def precision_choice() -> TableChoice:
    """``--precision``'s choices: every precision some backend's ``BackendSpec.precisions`` lists."""
    from vdeploy.runtime.backends import precisions

    return TableChoice(precisions)


def sampler_choice() -> TableChoice:
    from vdeploy.runtime.samplers import SAMPLERS

    return TableChoice(lambda: list(SAMPLERS))


def auto_help() -> str:
    """``auto``'s order for ``--backend``'s help."""
    from vdeploy.runtime.backends import BACKENDS

    return "auto: the fastest that runs here (" + " > ".join(
        name for _, name in sorted((s.auto_rank, n) for n, s in BACKENDS.items() if s.auto_rank is not None)) + ")."


def _click_type(option):
    if option.kind is str:
        return click.Choice(list(option.choices))
    if option.kind is int:
        return click.IntRange(option.min, option.max)
    return FiniteFloat(option.min, option.max)


def sampler_option_flags(command):
    """Decorate a command with one flag per option of the samplers table (``--spacing``, ``--order``, ``--eta``,
    ``--variant``, ...; default None: the sampler's own). The command receives them as keywords; collect them
    with ``sampler_options_of(kwargs)``."""
    from vdeploy.runtime.samplers import sampler_options, samplers_taking

    for name, option in reversed(list(sampler_options().items())):
        flag = "--" + name.replace("_", "-")
        takers = ", ".join(samplers_taking(name))
        command = click.option(flag, name, default=None, type=_click_type(option),
                               help=f"{option.help} Samplers: {takers}.  [default: the sampler's own]")(command)
    return command


def sampler_options_of(kwargs: dict) -> dict:
    """Pop the sampler-option flags (``sampler_option_flags``) out of a command's keywords: ``{name: value}``."""
    from vdeploy.runtime.samplers import sampler_options

    return {name: kwargs.pop(name) for name in sampler_options() if name in kwargs}


def variant_option_flags(command):
    """Decorate ``vdeploy export`` with one flag per graph variant that an export option asks for
    (``export.variants.VARIANTS``: ``--cfg``, ``--fp16``, ...); collect them with ``variant_options_of``."""
    from vdeploy.export.variants import VARIANTS  # a plain table module: no torch

    for name, variant in reversed([(n, v) for n, v in VARIANTS.items() if v.option is not None]):
        command = click.option("--" + variant.option.replace("_", "-"), variant.option, is_flag=True,
                               help=f"Also export {variant.file}: {variant.summary}.")(command)
    return command


def variant_options_of(kwargs: dict) -> dict:
    """Pop the graph-variant flags (``variant_option_flags``) out of a command's keywords."""
    from vdeploy.export.variants import variant_options

    return {option: kwargs.pop(option) for option in variant_options() if option in kwargs}
