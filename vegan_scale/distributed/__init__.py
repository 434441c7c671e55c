"""Distribution: the Accelerator (built in one place), DeepSpeed specifics, trained modules, rank agreement."""
