"""vdeploy.runtime: the sampling loop in numpy around the compiled denoiser. Never imports torch.

    from vdeploy.runtime import Pipeline, save_gif
    pipe = Pipeline.from_dir("model/")             # validates vdeploy.json, picks the fastest backend
    video = pipe(batch_size=4, sampler="dpmpp", steps=25, seed=0)   # (b, c, f, h, w) in [0, 1]
    save_gif(video, "sample.gif")

The samplers are pure functions over any ``eps = denoise(x, t, cond)`` callable (see ``samplers``).
Only numpy is imported here; onnxruntime, tokenizers, pillow, tensorrt and cuda-python are imported
when a backend, the text encoder or a writer needs them.
"""

from .backends import BACKENDS, BackendOptions
from .manifest import ManifestError
from .pipeline import Pipeline
from .platform import BackendUnavailable
from .samplers import SAMPLERS, ddim, ddpm, dpmpp, dpmpp3m, guided
from .schedule import cosine_beta_schedule, respace
from .unipc_multistep import unipc
from .video import save_gif, save_mp4

__all__ = [
    "BACKENDS",
    "BackendOptions",
    "SAMPLERS",
    "BackendUnavailable",
    "ManifestError",
    "Pipeline",
    "cosine_beta_schedule",
    "ddim",
    "ddpm",
    "dpmpp",
    "dpmpp3m",
    "guided",
    "respace",
    "save_gif",
    "save_mp4",
    "unipc",
]
