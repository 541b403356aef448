"""The extension points are one table entry each: a new sampler (with a new option), backend (with a new
precision), exported graph variant and benchmark section work from every consumer — the Pipeline, the CLI's
flags and choices, the server's request fields, the exporter, the benchmark — with no other edit and no
monkeypatching: each test adds its entry to the table and removes it after (README, "Architecture")."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from runtime_fixtures import model_dir
from vdeploy.runtime import Pipeline
from vdeploy.runtime.backends import BACKENDS, Backend, BackendOptions, BackendSpec, precisions
from vdeploy.runtime.samplers import SAMPLERS

# A one-step sampler with its own option `scale`: the x0 prediction from pure noise at the last training timestep.
ONE_STEP = textwrap.dedent('''
    import numpy as np
    from vdeploy.runtime.samplers import SamplerOption, SamplerSpec, StepRequest, drive, clip_x0

    def once_steps(x, betas, *, cond=None, steps=1, clip_denoised=True, dynamic_thres_percentile=None,
                   prediction_type="eps", callback=None, scale=1.0):
        abar = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))[-1]
        t = np.full((x.shape[0],), len(betas) - 1, dtype=np.int64)
        eps = yield StepRequest(x, t, cond, 0)
        x0 = (np.float32(1 / np.sqrt(abar)) * x - np.float32(np.sqrt(1 / abar - 1)) * eps) * np.float32(scale)
        return clip_x0(x0, dynamic_thres_percentile) if clip_denoised else x0

    def once(denoise, x, betas, **kwargs):
        return drive(once_steps(np.asarray(x, np.float32), betas, **kwargs), denoise)

    SPEC = SamplerSpec(once, once_steps, 1, False, (SamplerOption("scale", float, "x0 times this (test).", min=0.0),),
                       "one x0 prediction (test)")
''')

# A graph variant asked for by a new export option `copy`: a byte copy of the fp32 graph (as fp16 is a conversion).
COPY_VARIANT = textwrap.dedent('''
    import shutil
    from vdeploy.export.variants import GraphVariant

    def copy(src, dst):
        shutil.copyfile(src, dst)
        return {"copied_from": src.name}

    VARIANT = GraphVariant("denoiser_copy.onnx", "copy", False, "fp32", None, ("denoiser", copy), "forward", "atol",
                           False, "a byte copy (test)")
''')


def _load(source: str, name: str):
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - the same source the CLI subprocess registers
    return namespace[name]


@contextmanager
def entry(table: dict, name: str, value):
    """``table[name] = value`` for the block: what adding an extension is (removed after, for the other tests)."""
    assert name not in table
    table[name] = value
    try:
        yield value
    finally:
        del table[name]


def test_a_new_sampler_with_its_own_option_works_from_the_pipeline_and_the_server():
    from vdeploy.runtime.serve.requests import Invalid, fields, parse

    with entry(SAMPLERS, "once", _load(ONE_STEP, "SPEC")):
        pipe = Pipeline.from_dir(model_dir("uncond"), backend="cpu")
        noise = np.random.default_rng(0).standard_normal((2, *pipe.shape), dtype=np.float32)
        video = pipe(noise=noise, sampler="once", scale=0.5)
        abar = np.cumprod(1 - pipe.betas)[-1]
        t = np.full((2,), len(pipe.betas) - 1, dtype=np.int64)
        x0 = (noise / np.sqrt(abar) - np.sqrt(1 / abar - 1) * pipe.denoiser()(noise, t, None)) * 0.5
        np.testing.assert_allclose(video, np.clip((np.clip(x0, -1, 1) + 1) / 2, 0, 1), atol=1e-4)  # f32 vs f64 coefs
        with pytest.raises(ValueError, match=r"sampler 'once' takes no option eta \(its options: scale\)"):
            pipe(noise=noise, sampler="once", eta=0.5)
        # the server: a request field generated from the option, typed and range-checked as it declares
        assert "scale" in fields()
        assert parse({"sampler": "once", "scale": 0.5}, pipe).kwargs["scale"] == 0.5
        with pytest.raises(Invalid, match="scale: -1.0 is not in the range x>=0.0"):
            parse({"sampler": "once", "scale": -1.0}, pipe)
        with pytest.raises(Invalid, match="scale: sampler 'ddim' takes no option scale"):
            parse({"sampler": "ddim", "scale": 0.5}, pipe)
    assert "scale" not in fields()


def test_a_new_sampler_option_and_graph_variant_are_flags_of_the_cli(tmp_path):
    """Registered before the CLI is imported (as a plugin module would be): `sample --scale`, `parity --scale`,
    `export --copy`."""
    folder = model_dir("uncond")
    out = tmp_path / "once.gif"
    script = ONE_STEP + COPY_VARIANT + textwrap.dedent(f'''
        from click.testing import CliRunner
        from vdeploy.runtime import samplers
        from vdeploy.export import variants
        samplers.SAMPLERS["once"] = SPEC
        variants.VARIANTS["denoiser_copy"] = VARIANT
        from vdeploy.cli import main
        runner = CliRunner()
        assert "--scale" in runner.invoke(main, ["parity", "--help"]).output
        assert "--copy" in runner.invoke(main, ["export", "--help"]).output
        bad = runner.invoke(main, ["sample", "--model", {str(folder)!r}, "--out", {str(out)!r}, "--scale", "-1"])
        assert bad.exit_code == 2 and "-1.0 is not in the range x>=0.0" in bad.output, bad.output
        main(["sample", "--model", {str(folder)!r}, "--out", {str(out)!r}, "--sampler", "once", "--scale", "0.5",
              "--seed", "0", "--quiet"])
    ''')
    env = {**os.environ, "VDEPLOY_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "with once on " in result.stdout and out.stat().st_size > 0


def test_a_new_backend_entry_is_picked_by_auto_and_its_precision_is_a_choice():
    """A backend that wraps onnxruntime CPU and counts its calls, with a precision no other backend has."""
    from vdeploy.cli_options import precision_choice
    from vdeploy.runtime.platform import BackendUnavailable

    cpu = BACKENDS["cpu"]
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner, self.name, self.path = inner, "counting", inner.path
            self.inputs, self.outputs = inner.inputs, inner.outputs

        def run(self, feeds):
            calls.append(sorted(feeds))
            return self.inner.run(feeds)

        def close(self):
            self.inner.close()

    def open_counting(model_dir, manifest, graph, options):
        return Counting(cpu.open(model_dir, manifest, graph, BackendOptions(threads=options.threads)))

    folder = model_dir("uncond")
    reference = Pipeline.from_dir(folder, backend="cpu")(steps=2, seed=3)
    spec = BackendSpec(lambda m, o: None, open_counting, 5, False, "test", ("fp32", "int8"))  # int8 from fp32
    with entry(BACKENDS, "counting", spec):
        pipe = Pipeline.from_dir(folder)  # auto: rank 5 comes before onnxruntime CPU (9)
        assert pipe.backend_name == "counting" and isinstance(pipe.backend, Backend)
        np.testing.assert_array_equal(pipe(steps=2, seed=3), reference)
        assert calls == [["t", "x"]] * 2
        assert "int8" in precisions() and "int8" in precision_choice().choices
        assert Pipeline.from_dir(folder, precision="int8").backend_name == "counting"  # auto: the one taking int8
    assert "int8" not in precisions()
    with pytest.raises(ValueError, match="precision must be one of"):
        BackendOptions(precision="int8")
    unavailable = BackendSpec(lambda m, o: "needs a counter", open_counting, 5, True, "t")
    with entry(BACKENDS, "counting", unavailable):
        assert Pipeline.from_dir(folder).backend_name == "onnxruntime-cpu"  # unavailable: auto skips it
        with pytest.raises(BackendUnavailable, match="counting: needs a counter"):
            Pipeline.from_dir(folder, backend="counting")


def test_every_backend_implements_the_protocol():
    """The Backend protocol (name, path, inputs, outputs, run, close): checked on opened backends where they run
    here, and on the class's code where they cannot (TensorRT needs a GPU)."""
    from vdeploy.runtime.openvino import OpenVINOBackend
    from vdeploy.runtime.ort import OrtBackend
    from vdeploy.runtime.tensorrt import TensorRTBackend

    folder = model_dir("uncond")
    for name in ("cpu", "openvino"):
        pipe = Pipeline.from_dir(folder, backend=name)
        assert isinstance(pipe.backend, Backend), name
        pipe.close()
    for cls in (OrtBackend, OpenVINOBackend, TensorRTBackend):
        assert callable(cls.run) and callable(cls.close), cls
        source = inspect.getsource(cls.__init__)
        for attribute in ("name", "path", "inputs", "outputs"):
            assert f"self.{attribute}" in source or attribute in vars(cls), (cls, attribute)


def test_a_new_graph_variant_entry_is_exported_checked_and_loaded(tmp_path):
    """A derived variant, asked for by its own export option, is built, checked against PyTorch, hashed and
    recorded by the one export loop."""
    from export_fixtures import TINY_UNCOND_CONFIG, tiny_unet
    from vdeploy.export import exporter, variants
    from vdeploy.runtime import manifest as vmanifest

    unet, config = tiny_unet(TINY_UNCOND_CONFIG, seed=2)
    with entry(variants.VARIANTS, "denoiser_copy", _load(COPY_VARIANT, "VARIANT")):
        written = exporter.export_unet(unet, config, tmp_path / "m", optimize="none", copy=True)
        assert "denoiser_copy" not in variants.selected({}), "built only when its option asks for it"
    loaded = vmanifest.load(tmp_path / "m")
    assert loaded == written
    assert loaded.graphs["denoiser_copy"].optimization == {"copied_from": "denoiser.onnx"}
    assert loaded.files["denoiser_copy.onnx"] == loaded.files["denoiser.onnx"]
    assert max(loaded.parity["denoiser_copy"]["max_abs_err"].values()) <= 1e-4
    with pytest.raises(TypeError, match="unknown option"):
        exporter.export_unet(unet, config, tmp_path / "o", copy=True)  # the entry is gone


def test_a_new_bench_section_runs_in_table_order_and_can_be_skipped():
    from vdeploy.bench.cli import SECTIONS, Bench, Section, parse_args, run_sections

    seen = []

    def mine(bench):
        seen.append(bench.backend)
        return {"rows": len(bench.timed)}

    with entry(SECTIONS, "mine", Section(mine, "my_section", "a test section")):
        args = parse_args(["--skip", ",".join(n for n in SECTIONS if n != "mine")])
        bench = Bench(args, {}, {}, None, None, Path("."), None, [1, 2], "cpu", 1, lambda section: None)
        run_sections(bench, args.skip)
        assert seen == ["cpu"] and bench.out["my_section"] == {"rows": 2}
        assert all(bench.out[s.key] is None for n, s in SECTIONS.items() if n != "mine")
        assert parse_args(["--skip", "mine"]).skip == {"mine"}
    with pytest.raises(SystemExit):
        parse_args(["--skip", "mine"])


def test_the_readme_add_x_table_names_real_files_and_tables():
    """README "Architecture": every file the "to add | files to change" table names exists, and so does every
    table the tables' table names (the docs stay as true as the code)."""
    import importlib
    import re

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    section = text[text.index("## Architecture"):]
    section = section[: section.find("\n## ", 4)] if "\n## " in section[4:] else section
    add_x = section[section.index("| to add | files to change |"):].split("\n\n")[0]
    rows = [line for line in add_x.splitlines()[2:] if line.startswith("| ")]
    assert len(rows) == 8, rows
    paths = {p for p in re.findall(r"`([\w/<>.]+\.py|[\w/]+/)`", add_x) if "<" not in p}
    assert paths, add_x
    for path in paths:
        assert (root / path).exists(), path
    tables = re.findall(r"\| `((?:runtime|export|vdeploy)\.[\w.]+\.[A-Z_]+)` \|", section)
    assert len(tables) == 4, tables
    for table in tables:
        module, name = table.rsplit(".", 1)
        module = module if module.startswith("vdeploy.") else f"vdeploy.{module}"
        assert isinstance(getattr(importlib.import_module(module), name), dict), table
