"""dash-shapes: a synthetic VQA set and tiny VLMs trained on it, so that accuracy can be measured offline."""
