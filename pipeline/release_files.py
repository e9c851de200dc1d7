"""File names of the original Wan2.1 release folder (the seed's `--ckpt_dir ../Wan2.1-T2V-1.3B`).

Apart from `pipeline.loading`, which detects the layout, and `pipeline.original`, which loads it:
neither imports the other at module level.
"""

ORIGINAL_FILES = (
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "models_t5_umt5-xxl-enc-bf16.pth",
    "Wan2.1_VAE.pth",
    "google/umt5-xxl",
)
