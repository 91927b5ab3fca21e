"""The application layer: the driver loop, evaluation, tracking and the `solray` command line.

It sits above every other package (rewards <- rollout <- quant, rl <- actors <- solray) and is the
only one that knows Ray actor groups, the run's output directory and the command line.
"""
