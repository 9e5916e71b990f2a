"""Model wrappers: PathCLIP, zero-shot, sub-models, captioner."""
