"""Geometry, displacement fields, data reading and evaluation shared by every script."""
