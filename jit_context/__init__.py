"""The process that owns requests: tokenizer, sampling, stop handling, detokenization, client sockets."""
