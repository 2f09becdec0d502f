"""tune_pets: Ray Tune hyperparameter search for Oxford-IIIT Pet classification.

Data flows one way: prepare -> dataset cache -> [feature cache] -> fit <- search
-> reproduce -> evaluate -> profile -> report. Only ``tune_pets.search`` imports Ray.
"""

__version__ = "0.1.0"
