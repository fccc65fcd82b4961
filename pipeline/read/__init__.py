"""The reading wing: image -> text (the one forward pass, CTC decoding, the recognizer, metrics). It
stands on the model wing, whose checkpoints carry their preprocessing."""
