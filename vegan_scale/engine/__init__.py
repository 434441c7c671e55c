"""The training engine: the POT objective, schedules, evaluation and the loop."""
