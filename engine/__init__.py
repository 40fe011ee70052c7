"""fairsynth: fair image classifiers from group-balanced synthetic images, as a Ray engine."""

__version__ = "0.1.0"
