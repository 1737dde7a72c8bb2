"""Operator tools that ship with the platform."""
