"""Image quality: PSNR / SSIM, and the classical baselines each task is compared against."""
