"""Running an experiment's members: on this machine (`experiment`, slot plans over GPUs or CPU
processes) or on SLURM (`slurm`, with the jobs in `jobs`)."""
