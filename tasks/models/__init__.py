"""What talks to a model: generation backends, the configured policy, the tiny CPU
policy, the judge clients, answer checking and prompt templates."""
