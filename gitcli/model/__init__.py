"""The networks and their checkpoints: vision tower, mapping, LM, the captioner."""
