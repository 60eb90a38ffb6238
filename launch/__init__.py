"""Launchers: TPU VM slices (gcloud, queued resources), xpk on GKE, GPU hosts. Run from the repository
root as `python -m launch.<name> --help`; every launcher has --dry-run."""
