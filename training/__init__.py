"""AnimalID training package: per-species face-ID models (ResNet18 + ArcFace), evaluation and export.

The service imports only :mod:`training.model`, :mod:`training.preprocess`, :mod:`training.artifact`
and :mod:`training.gradcam` from here.
"""

__version__ = "0.1.0"
