"""Recipes, the RL algorithms (pure torch functions and their registered objects), the trainer and checkpoints."""
