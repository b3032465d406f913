"""Running the stack past one machine: the Slurm batch script `rpo slurm script` writes (`slurm`), and the
Kubernetes manifests' renderer and dashboard ConfigMap (`kustomize`). Nothing here starts a process: it
writes and checks the files a scheduler runs (deploy/slurm/, deploy/kubernetes/)."""
