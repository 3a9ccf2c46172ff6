"""What a user measures and runs: perplexity, generation."""
