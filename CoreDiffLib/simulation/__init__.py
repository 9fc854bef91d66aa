"""Physically simulated low-dose CT: phantoms, fan-beam projection/FBP, dose noise, datasets."""
from .phantom import make_phantom
from .projector import FanBeamGeometry, fbp, forward_project, hu_to_mu, mu_to_hu
from .noise import add_projection_noise, simulate_ldct
from .dataset import noise_free_reconstruction, simulate_dataset, simulate_pair

__all__ = ["make_phantom", "FanBeamGeometry", "forward_project", "fbp", "hu_to_mu", "mu_to_hu",
           "add_projection_noise", "simulate_ldct", "simulate_pair", "simulate_dataset",
           "noise_free_reconstruction"]
