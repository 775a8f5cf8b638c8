"""The denoising task (spec ``denoise``): DDPM's noising and its training pairs, the DDIM
sampler (``diffusion``), diffusers U-Nets as model source (``diffusers_source``), the Fréchet
judge of generated samples (``frechet``), and the task entry itself (``task``)."""
