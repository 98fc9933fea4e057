"""Classification tasks (the models are the transformers' and backbones' heads)."""
