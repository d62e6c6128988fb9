"""Conditioners: named producers of `cond` entries, from a training batch and from user input at sampling time.

See base.py for the interface; one file per kind (classlabel.py), registered in config.registry.
"""
from .base import CondSpec, Conditioner, Conditioning
from .classlabel import ClassConditioner, ClassConditionerConfig

__all__ = ["CondSpec", "Conditioner", "Conditioning", "ClassConditioner", "ClassConditionerConfig"]
