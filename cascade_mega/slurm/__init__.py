"""Slurm: cluster profiles, sbatch scripts, submission (single runs, arrays, chains), requeue
decisions inside the job, and `cascade jobs`."""
