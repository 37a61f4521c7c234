"""Training only a subnetwork: masked optimizers, TRL recipes, tasks and tracking."""
