"""Robustness evaluation of one model as a study file describes it: attacks (with severity sweeps),
occlusion, common corruptions, transfer attacks, and gradient-masking checks."""
