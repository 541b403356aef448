"""vdeploy: train, export and deploy video-diffusion U-Nets.

Kept light on purpose: ``import vdeploy`` and ``import vdeploy.runtime`` never import torch.
The torch half lives in ``vdeploy.model``, ``vdeploy.diffusion``, ``vdeploy.trainer``, imported on use.
"""

__version__ = "0.1.0"
