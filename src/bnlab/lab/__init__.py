"""The lab: data, models, one training loop, experiments and their report."""
