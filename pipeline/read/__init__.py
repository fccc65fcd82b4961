"""The reading wing: image -> text (preprocess, the one forward pass, CTC decoding, the recognizer,
metrics)."""
