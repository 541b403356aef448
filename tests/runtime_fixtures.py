"""Helpers for the runtime tests: the upstream reference package, tiny model directories.

Model directories are built once per test session (cached here, removed at exit): the tiny upstream
``video_diffusion_pytorch`` 0.6.3 ``Unet3D`` exported with ``torch.onnx.export`` and written with
``vdeploy.runtime.manifest.Manifest.write``, plus a tiny ONNX text encoder and a ``tokenizers`` tokenizer. They
serve the tests that tamper with files or need a text encoder / an unconditioned graph; parity runs on
the export stage's own fixture (``export_fixtures.exported_model``). ``write_model_dir(fused_cfg=True)``
also writes a ``--cfg`` graph for manual checks.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from vdeploy.runtime import manifest
from vdeploy.runtime.manifest import TensorSpec
from vdeploy.runtime.schedule import cosine_beta_schedule

TINY = {"dim": 8, "dim_mults": [1, 2], "attn_heads": 2, "attn_dim_head": 8}
VIDEO = {"channels": 3, "num_frames": 4, "image_size": 8}
COND_DIM = 6
TIMESTEPS = 50
VOCAB = ["[PAD]", "[UNK]", "a", "red", "blue", "ball", "cube", "moving", "left", "right"]

_ROOT = Path(tempfile.mkdtemp(prefix="vdeploy-runtime-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
_CACHE: dict = {}


def upstream():
    """The reference ``video_diffusion_pytorch`` 0.6.3 main module (conftest's loader stubs torchvision)."""
    from conftest import load_reference

    return load_reference("0.6.3")


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run torch single-threaded: 2 shared cores make tiny models pay for oversubscription."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_unet(cond_dim: int | None = None, seed: int = 0):
    """A tiny upstream Unet3D in eval mode, with random (non-zero) weights."""
    import torch

    vdp = upstream()
    torch.manual_seed(seed)
    kwargs = {**TINY, "dim_mults": tuple(TINY["dim_mults"])}
    unet = vdp.Unet3D(**kwargs, cond_dim=cond_dim, channels=VIDEO["channels"]).eval()
    with torch.no_grad():  # the final conv starts at zero-ish scale; widen it so eps is not trivial
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet


def config(cond_dim: int | None = None, timesteps: int = TIMESTEPS, **extra) -> dict:
    return {**TINY, **VIDEO, "cond_dim": cond_dim, "timesteps": timesteps, **extra}


def _export(module, args, path: Path, names: list[str], dynamic: dict) -> None:
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=names, output_names=["eps"],
            dynamic_axes={**dynamic, "eps": {0: "batch"}}, opset_version=17, dynamo=False,
        )


def write_model_dir(folder: Path, unet, cfg: dict, *, fused_cfg: bool = False, text_encoder: bool = False) -> Path:
    """Export ``unet`` to ``folder`` as the export stage lays a model directory out."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    c, f, s = cfg["channels"], cfg["num_frames"], cfg["image_size"]
    cond_dim = cfg.get("cond_dim")
    x = torch.randn(1, c, f, s, s)
    t = torch.tensor([3])

    class Denoiser(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, cond=None):
            return self.unet(x, t, cond=cond)

    class CfgDenoiser(torch.nn.Module):
        """cond and null prediction as one batch of 2b, combined in the graph."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, cond, cond_scale):
            null = self.unet.null_cond_emb.expand(x.shape[0], -1)
            eps = self.unet(torch.cat([x, x]), torch.cat([t, t]), cond=torch.cat([cond, null]))
            eps_cond, eps_null = eps.chunk(2)
            return eps_null + (eps_cond - eps_null) * cond_scale

    x_spec = TensorSpec("x", "float32", ("batch", c, f, s, s), "x")
    t_spec = TensorSpec("t", "int64", ("batch",), "t")
    outputs = (TensorSpec("eps", "float32", ("batch", c, f, s, s)),)
    graphs = {}
    if cond_dim is None:
        _export(Denoiser(unet), (x, t), folder / "denoiser.onnx", ["x", "t"], {"x": {0: "batch"}, "t": {0: "batch"}})
        inputs = (x_spec, t_spec)
    else:
        cond = torch.randn(1, cond_dim)
        dyn = {"x": {0: "batch"}, "t": {0: "batch"}, "cond": {0: "batch"}}
        _export(Denoiser(unet), (x, t, cond), folder / "denoiser.onnx", ["x", "t", "cond"], dyn)
        inputs = (x_spec, t_spec, TensorSpec("cond", "float32", ("batch", cond_dim), "cond"))
        np.save(folder / "null_cond_emb.npy", unet.null_cond_emb.detach().numpy().astype(np.float32))
        if fused_cfg:
            scale = torch.tensor(2.0)
            _export(CfgDenoiser(unet), (x, t, cond, scale), folder / "denoiser_cfg.onnx",
                    ["x", "t", "cond", "cond_scale"], dyn)
            graphs["denoiser_cfg"] = manifest.Graph(
                "denoiser_cfg.onnx", inputs + (TensorSpec("cond_scale", "float32", (), "cond_scale"),), outputs,
                guidance=True)
    graphs["denoiser"] = manifest.Graph("denoiser.onnx", inputs, outputs)
    if text_encoder:
        write_text_encoder(folder / "text_encoder", cond_dim)
    manifest.Manifest(
        vdeploy_version="0.1.0",
        config=cfg,
        source={"checkpoint": "tests", "format": "video-diffusion-pytorch", "step": 0, "ema": False},
        opset=17,
        graphs=graphs,
        schedule=manifest.Schedule(cfg["timesteps"], tuple(cosine_beta_schedule(cfg["timesteps"]).tolist())),
        conditioning=manifest.Conditioning(
            cond_dim=cond_dim,
            null_embedding="null_cond_emb.npy" if cond_dim else None,
            text_encoder="text_encoder" if text_encoder else None,
        ),
    ).write(folder)
    return folder


def write_text_encoder(folder: Path, dim: int, seed: int = 0) -> np.ndarray:
    """A word-level tokenizer and an ONNX masked-mean-pooled embedding table; returns the table."""
    import onnx
    from onnx import TensorProto, helper
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    table = np.random.default_rng(seed).standard_normal((len(VOCAB), dim)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),  # b n d
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "axis1"], ["count"], keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "text_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        initializer=[
            onnx.numpy_helper.from_array(table, "table"),
            onnx.numpy_helper.from_array(np.array([2], np.int64), "axis2"),
            onnx.numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    return table


def model_dir(kind: str) -> Path:
    """A cached tiny model directory: ``"uncond"`` or ``"cond"`` (with null embedding and text encoder).

    Returns a fresh copy each call, so a test may tamper with it.
    """
    if kind not in _CACHE:
        with torch_threads(1):
            if kind == "uncond":
                path = write_model_dir(_ROOT / kind, tiny_unet(), config())
            elif kind == "cond":
                path = write_model_dir(_ROOT / kind, tiny_unet(COND_DIM), config(COND_DIM), text_encoder=True)
            else:
                raise ValueError(kind)
        _CACHE[kind] = path
    copy = Path(tempfile.mkdtemp(dir=_ROOT, prefix=f"{kind}-"))
    shutil.copytree(_CACHE[kind], copy, dirs_exist_ok=True)
    return copy


def numpy_denoiser(module, **kwargs):
    """A torch module as the runtime's contract ``eps = denoise(x, t, cond)`` on numpy arrays."""
    import torch

    def denoise(x, t, cond):
        with torch.inference_mode():
            c = None if cond is None else torch.from_numpy(np.ascontiguousarray(cond))
            return module(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(t), cond=c, **kwargs).numpy()

    return denoise
