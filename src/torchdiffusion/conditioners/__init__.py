"""Conditioners: named producers of `cond` entries, from a training batch and from user input at sampling time.

See base.py for the interface; one file per kind (classlabel.py, augment.py), registered in config.registry.
"""
from .augment import AugmentConditioner
from .base import CondSpec, Conditioner, Conditioning
from .classlabel import ClassConditioner, ClassConditionerConfig

__all__ = ["AugmentConditioner", "CondSpec", "Conditioner", "Conditioning", "ClassConditioner", "ClassConditionerConfig"]
