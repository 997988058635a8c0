"""A transformers model stepped one decoder layer at a time, and the activations
cached between layers; free of mergekit."""
