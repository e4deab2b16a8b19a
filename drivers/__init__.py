"""Device drivers for Lifeline Edge Agent.

This package is a leaf: it never imports :mod:`agent`. Each driver pairs a pydantic config
model with a small class, and :data:`drivers.registry.DRIVERS` lists them explicitly.
"""
