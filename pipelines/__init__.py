"""ZenML pipelines: wiring only. ``distillation`` trains and promotes; ``predict`` serves."""
