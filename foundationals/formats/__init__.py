"""Key maps from the file layouts users download (original LDM/SGM single files, diffusers, kohya, ...) to ours."""
