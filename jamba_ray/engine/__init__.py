"""The engine: scheduling, the step loop, outputs and recovery; drivers `LLM` and `AsyncEngine`."""
