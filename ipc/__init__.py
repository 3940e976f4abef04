"""Everything that crosses the process boundary: messages, channels, shared tensors, errors."""
