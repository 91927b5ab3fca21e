"""Recipes, the driver loop, and the RL algorithms as pure torch functions."""
