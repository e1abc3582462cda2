"""Training: the loop, schedules, resume state, memory estimates, DeepSpeed configs."""
