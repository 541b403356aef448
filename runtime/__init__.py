"""vdeploy.runtime: the sampling loop in numpy around the compiled denoiser. Never imports torch."""
