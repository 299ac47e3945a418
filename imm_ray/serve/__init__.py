"""OpenAI-compatible HTTP serving of a run's checkpoints (pure logic here; Ray Serve in services/)."""
