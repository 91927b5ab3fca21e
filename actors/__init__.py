"""Ray actors and their groups: rollout (explore copies), reward hosts, learners. Thin: the math lives in rl/, rollout/, quant/."""
