"""The data wing: what makes and streams samples (seeds, the `captcha` and `mixed` styles, image
decoding, shards + manifest, sources, labelled folders). It imports no other wing, so a model
change never reruns the data stages."""
