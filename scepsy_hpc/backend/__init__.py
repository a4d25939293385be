"""Where jobs run: the ClusterBackend seam (slurm, local), the job templates, the node agent, serving sessions."""
